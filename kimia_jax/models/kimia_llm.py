"""The Kimi-Audio LLM: Qwen2 trunk, VQ adaptor, MIMO audio branch, text and audio heads.

Twin of `MoonshotKimiaForCausalLM` (spec/llm.md §3). Parameter paths mirror the HF tensor names
with the leading `model.` dropped and list indices as `layers_<i>`:
    embed_tokens/weight                       model.embed_tokens.weight        [V, D]
    layers_<i>/self_attn/q_proj/{weight,bias} model.layers.<i>.self_attn.q_proj.*
    mimo_layers_<j>/...                       model.mimo_layers.<j>.*
    vq_adaptor/layers_{0,3,4}/...             model.vq_adaptor.layers.{0,3,4}.*
    norm/weight, mimo_norm/weight             model.norm.weight, model.mimo_norm.weight
    lm_head/weight, mimo_output/weight        lm_head.weight, mimo_output.weight   [V, D]
Layers are unrolled (one parameter set each): decode reads every weight once per token, and an
unrolled stack decoded about 2x faster than `nn.scan` over stacked weights on CPU (perf-notes.md).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax import sharding
from kimia_jax.configs import LlmConfig
from kimia_jax.layers.attention import Attention, LayerKV
from kimia_jax.layers.linear import Linear, matmul_t
from kimia_jax.layers.norm import LayerNorm, RMSNorm


@flax.struct.dataclass
class KVCache:
    """Static-shape cache of all main then MIMO layers (the reference `past_key_values` order).

    k[i], v[i]: [B, S, K, H]; slot = absolute position. How many slots are filled is tracked by
    the caller (positions), so the cache itself stays a plain pytree of fixed shapes.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")


def init_cache(cfg: LlmConfig, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """Zero cache for `batch` rows and `max_length` positions, in the compute dtype by default."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
    n = cfg.num_layers_total
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
    )


def cache_logical_axes(cfg: LlmConfig) -> KVCache:
    n = cfg.num_layers_total
    return KVCache(k=(CACHE_AXES,) * n, v=(CACHE_AXES,) * n)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); twin of Qwen2MLP."""

    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = Linear(self.intermediate_size, ("mlp", "embed"), name="gate_proj", **kw)(x)
        u = Linear(self.intermediate_size, ("mlp", "embed"), name="up_proj", **kw)(x)
        h = sharding.constrain(nn.silu(g) * u, ("batch", "length", "act_mlp"))
        return Linear(x.shape[-1], ("embed", "mlp"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    """Pre-norm Qwen2 block: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."""

    cfg: LlmConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerKV | None,
        attend_cache: bool,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV]:
        c = self.cfg
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        h, kv = Attention(
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.rope_theta,
            name="self_attn",
            **kw,
        )(
            RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x),
            positions,
            cache,
            attend_cache,
            segment_ids,
        )
        h = sharding.constrain(x + h, ("batch", "length", "act_embed"))
        out = h + MLP(c.intermediate_size, name="mlp", **kw)(
            RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(h)
        )
        return sharding.constrain(out, ("batch", "length", "act_embed")), kv


class VQAdaptor(nn.Module):
    """LayerNorm(W3 silu(W0 x + b0) + b3), eps = rms_norm_eps (spec/llm.md §3.1)."""

    cfg: LlmConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, Din] -> [B, T, D]
        c = self.cfg
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        h = Linear(c.hidden_size, ("embed", "adaptor_in"), use_bias=True, name="layers_0", **kw)(x)
        h = Linear(
            c.hidden_size, ("embed", "norm"), use_bias=True, bias_axis="norm", name="layers_3", **kw
        )(nn.silu(h))
        return LayerNorm(c.rms_norm_eps, name="layers_4", **kw)(h)


class VocabParam(nn.Module):
    """A [V, D] matrix used as embedding table or output head (HF `.weight`)."""

    vocab_size: int
    features: int
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 1.0

    def setup(self) -> None:
        self.weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed")),
            (self.vocab_size, self.features),
            self.param_dtype,
        )

    def lookup(self, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.weight, ids, axis=0).astype(dtype)

    def logits(self, h: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] fp32
        return matmul_t(h, self.weight.astype(h.dtype), preferred_element_type=jnp.float32)


@flax.struct.dataclass
class LlmOutput:
    text_logits: jax.Array | None  # [B, T', V] fp32 (T' = T or 1); None with hidden_only
    audio_logits: jax.Array | None  # [B, T', V] fp32
    cache: KVCache | tuple[LayerKV, ...]
    aux: dict[str, jax.Array]


class KimiaLLM(nn.Module):
    """MoonshotKimiaForCausalLM in Flax (spec/llm.md §3)."""

    cfg: LlmConfig

    def setup(self) -> None:
        c = self.cfg
        self.embed_tokens = VocabParam(c.vocab_size, c.hidden_size, jnp.dtype(c.param_dtype))
        self.layers = [DecoderLayer(c, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.mimo_layers = [
            DecoderLayer(c, name=f"mimo_layers_{j}") for j in range(c.kimia_mimo_layers)
        ]
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.norm = RMSNorm(c.rms_norm_eps, **kw)
        self.mimo_norm = RMSNorm(c.rms_norm_eps, **kw)
        std = 1.0 / np.sqrt(c.hidden_size)
        self.lm_head = VocabParam(c.vocab_size, c.hidden_size, jnp.dtype(c.param_dtype), std)
        self.mimo_output = VocabParam(c.vocab_size, c.hidden_size, jnp.dtype(c.param_dtype), std)
        if c.use_whisper_feature:
            self.vq_adaptor = VQAdaptor(c)

    def embed(
        self,
        audio_ids: jax.Array,
        text_ids: jax.Array,
        features: jax.Array | None,
        continuous_mask: jax.Array | None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """inputs_embeds [B, T, D] of §3.1 (and the raw adaptor output for parity checks)."""
        dtype = jnp.dtype(self.cfg.dtype)
        a = self.embed_tokens.lookup(audio_ids, dtype)
        aux: dict[str, jax.Array] = {}
        if features is not None and self.cfg.use_whisper_feature:
            # The adaptor runs on every row (zero rows included) and is masked afterwards, as in
            # the reference; the sqrt(2) scalar is rounded to the feature dtype (quirk 3).
            adapted = self.vq_adaptor(features)
            aux["adaptor_out"] = adapted
            sqrt2 = jnp.asarray(np.sqrt(2.0), features.dtype).astype(dtype)
            mixed = (a + adapted.astype(dtype)) * sqrt2
            a = jnp.where(continuous_mask[..., None], mixed, a)
        # Text embedding only where the row's text ids are not all zero (reference quirk 6,
        # re-derived per row for batches).
        use_text = (jnp.sum(text_ids, axis=1) != 0)[:, None, None]
        x = jnp.where(use_text, a + self.embed_tokens.lookup(text_ids, dtype), a)
        return sharding.constrain(x, ("batch", "length", "act_embed")), aux

    def __call__(
        self,
        audio_ids: jax.Array,
        text_ids: jax.Array,
        positions: jax.Array,
        features: jax.Array | None = None,
        continuous_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        attend_cache: bool = False,
        logits_at: jax.Array | None = None,
        collect: bool = False,
        segment_ids: jax.Array | None = None,
        hidden_only: bool = False,
    ) -> LlmOutput:
        """One forward call over T positions of both streams.

        Args:
          audio_ids, text_ids: [B, T] int32 the two input streams.
          positions: [B, T] int32 absolute positions (also the cache slots written).
          features: [B, T, Din] continuous whisper features already scattered to their positions
            (zeros elsewhere), or None (decode steps, prompts without audio).
          continuous_mask: [B, T] bool, positions that take `features`.
          cache: static KV cache to write into (and attend over when `attend_cache`).
          logits_at: [B] int32 position index (within this call) whose logits to return; None
            returns logits for all T positions.
          collect: also return every layer output and norm output in `aux` (parity tests).
          segment_ids: [B, T] int32 packed-example ids (training rows): attention stays within
            equal ids (positions restart per example). None: one sequence per row.
          hidden_only: skip both head matmuls (logits None) and return the final normed hidden
            states as aux["norm_out"], aux["mimo_norm_out"] (training computes a chunked CE).
        Returns:
          LlmOutput with fp32 text and audio logits and the updated cache (or fresh per-layer kv).
        """
        c = self.cfg
        x, aux = self.embed(audio_ids, text_ids, features, continuous_mask)
        if collect:
            aux["inputs_embeds"] = x
        kvs: list[LayerKV] = []
        main_outs, mimo_outs = [], []
        m = None
        for i, layer in enumerate(self.layers):
            x, kv = layer(
                x,
                positions,
                None if cache is None else (cache.k[i], cache.v[i]),
                attend_cache,
                segment_ids,
            )
            kvs.append(kv)
            main_outs.append(x)
            if i == c.kimia_mimo_transformer_from_layer_index:
                m = x  # the un-normalised residual stream seeds the MIMO branch (§3.4)
        for j, layer in enumerate(self.mimo_layers):
            idx = c.num_hidden_layers + j
            m, kv = layer(
                m,
                positions,
                None if cache is None else (cache.k[idx], cache.v[idx]),
                attend_cache,
                segment_ids,
            )
            kvs.append(kv)
            mimo_outs.append(m)
        if logits_at is not None:
            take = jax.vmap(lambda h, i: jax.lax.dynamic_slice_in_dim(h, i, 1, axis=0))
            x, m = take(x, logits_at), take(m, logits_at)
        h_text, h_audio = self.norm(x), self.mimo_norm(m)
        if hidden_only:
            aux.update(norm_out=h_text, mimo_norm_out=h_audio)
            return LlmOutput(text_logits=None, audio_logits=None, cache=(), aux=aux)
        text_logits = sharding.constrain(
            self.lm_head.logits(h_text), ("batch", "length", "act_vocab")
        )
        audio_logits = sharding.constrain(
            self.mimo_output.logits(h_audio), ("batch", "length", "act_vocab")
        )
        if collect:
            aux.update(
                main_layer_outputs=jnp.stack(main_outs),
                mimo_layer_outputs=jnp.stack(mimo_outs),
                norm_out=h_text,
                mimo_norm_out=h_audio,
            )
        new_cache = (
            KVCache(k=tuple(k for k, _ in kvs), v=tuple(v for _, v in kvs))
            if cache is not None
            else tuple(kvs)
        )
        return LlmOutput(
            text_logits=text_logits, audio_logits=audio_logits, cache=new_cache, aux=aux
        )


def example_inputs(cfg: LlmConfig, batch: int = 1, length: int = 2) -> dict[str, jax.Array]:
    """Minimal inputs for `init` / `eval_shape`."""
    ids = jnp.zeros((batch, length), jnp.int32)
    out = dict(audio_ids=ids, text_ids=ids, positions=ids)
    if cfg.use_whisper_feature:
        out["features"] = jnp.zeros((batch, length, cfg.kimia_adaptor_input_dim), jnp.float32)
        out["continuous_mask"] = jnp.zeros((batch, length), bool)
    return out


def abstract_params(cfg: LlmConfig) -> Any:
    """Boxed (nn.Partitioned) tree of ShapeDtypeStruct for the parameters, without allocating."""
    model = KimiaLLM(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **example_inputs(cfg)))["params"]


def init_params(cfg: LlmConfig, key: jax.Array) -> Any:
    """Random parameters (unboxed), for benchmarks and tests."""
    return nn.unbox(KimiaLLM(cfg).init(key, **example_inputs(cfg))["params"])

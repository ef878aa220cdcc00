"""The Kimi-Audio LLM: Qwen2 trunk, VQ adaptor, MIMO audio branch, text and audio heads.

Twin of `MoonshotKimiaForCausalLM` (spec/llm.md §3). Parameter paths mirror the HF tensor names
with the leading `model.` dropped and list indices as `layers_<i>`:
    embed_tokens/weight                       model.embed_tokens.weight        [V, D]
    layers_<i>/self_attn/q_proj/{weight,bias} model.layers.<i>.self_attn.q_proj.*
    mimo_layers_<j>/...                       model.mimo_layers.<j>.*
    vq_adaptor/layers_{0,3,4}/...             model.vq_adaptor.layers.{0,3,4}.*
    norm/weight, mimo_norm/weight             model.norm.weight, model.mimo_norm.weight
    lm_head/weight, mimo_output/weight        lm_head.weight, mimo_output.weight   [V, D]
That is the unrolled layout (`cfg.scan_layers=False`, the default): one parameter set per layer,
which decodes fastest on CPU (decode reads every weight once per token). With
`cfg.scan_layers=True` each stack is one `nn.scan` over stacked parameters `layers/...` and
`mimo_layers/...` with a leading layer axis (logical name "layers"): one compiled layer per stack,
so compile time does not grow with depth (training). `stack_layers` / `unstack_layers` convert a
parameter tree between the two layouts (checkpoints hold the unrolled one; `to_layout` is what the
loader applies). `cfg.remat_policy` rematerializes every layer in the backward pass
(`REMAT_POLICIES`). Measured decode speed and compile time of both: tools/bench_layer_stack.py.
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
from kimia_jax.layers import quant
from kimia_jax.layers.attention import Attention, LayerKV
from kimia_jax.layers.kv_cache import KVCache
from kimia_jax.layers.linear import Linear, matmul_t
from kimia_jax.layers.mlp import MLP
from kimia_jax.layers.norm import LayerNorm, RMSNorm
from kimia_jax.layers.quant import QWeight
from kimia_jax.layers.remat import REMAT_POLICIES, remat_policy  # noqa: F401 (re-export)


def init_cache(cfg: LlmConfig, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """Zero cache of all main then MIMO layers (the reference `past_key_values` order) for `batch`
    rows and `max_length` positions (slot = absolute position), in the compute dtype by default.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    return KVCache.zeros(
        cfg.num_layers_total, batch, max_length, cfg.num_key_value_heads, cfg.head_dim, dtype
    )


def cache_logical_axes(cfg: LlmConfig) -> KVCache:
    del cfg  # the same names for every size
    return KVCache.logical_axes()


# Remat policies by name (`LlmConfig.remat_policy`): the shared table of `layers.remat`.
_remat_policy = remat_policy


class DecoderLayer(nn.Module):
    """Pre-norm Qwen2 block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)).

    `layer` is this layer's index in the cache (a traced scalar inside a scan).
    `causal_by_index`: the attention mask of cache-less calls from the static causal structure
    (`Attention.causal_by_index`).
    """

    cfg: LlmConfig
    causal_by_index: bool = False

    def setup(self) -> None:
        c = self.cfg
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.self_attn = Attention(
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.rope_theta,
            causal_by_index=self.causal_by_index,
            implementation=c.attention_implementation,
            **kw,
        )
        self.mlp = MLP(c.intermediate_size, gated=True, activation="silu", **kw)
        self.input_layernorm = RMSNorm(c.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, **kw)

    def block(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: KVCache | None,
        layer: int | jax.Array,
        attend_cache: bool,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | LayerKV]:
        h, kv = self.self_attn(
            self.input_layernorm(x), positions, cache, layer, attend_cache, segment_ids
        )
        h = sharding.constrain(x + h, ("batch", "length", "act_embed"))
        out = h + self.mlp(self.post_attention_layernorm(h))
        return sharding.constrain(out, ("batch", "length", "act_embed")), kv

    def __call__(self, x, positions, cache, layer, attend_cache, segment_ids=None):
        return self.block(x, positions, cache, layer, attend_cache, segment_ids)


class ScanStep(DecoderLayer):
    """One step of `nn.scan` over a layer stack (the same parameters as `DecoderLayer`).

    carry: (x, seed, cache): the residual stream, the output of stack layer `seed_at` (it seeds
    the MIMO branch) and the cache (or None). xs: the layer number j within the stack.
    ys: (this layer's fresh (k, v) when there is no cache, else None; its output if `collect`).
    """

    cache_offset: int = 0  # cache index of the stack's first layer
    seed_at: int = -1
    attend_cache: bool = False
    collect: bool = False

    def __call__(self, carry, j, positions, segment_ids=None):  # type: ignore[override]
        x, seed, cache = carry
        x, kv = self.block(
            x, positions, cache, self.cache_offset + j, self.attend_cache, segment_ids
        )
        seed = jnp.where(j == self.seed_at, x, seed)
        if cache is not None:
            cache, kv = kv, None
        return (x, seed, cache), (kv, x if self.collect else None)


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
        if isinstance(self.weight, QWeight):
            return self.weight.rows(ids, dtype)
        return jnp.take(self.weight, ids, axis=0).astype(dtype)

    def logits(self, h: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] fp32
        w = self.weight if isinstance(self.weight, QWeight) else self.weight.astype(h.dtype)
        return matmul_t(h, w, preferred_element_type=jnp.float32)


@flax.struct.dataclass
class LlmOutput:
    text_logits: jax.Array  # [B, T', V] fp32 (T' = T, or 1 with `logits_at`)
    audio_logits: jax.Array  # [B, T', V] fp32
    cache: KVCache | tuple[LayerKV, ...]
    aux: dict[str, jax.Array]


class KimiaLLM(nn.Module):
    """MoonshotKimiaForCausalLM in Flax (spec/llm.md §3)."""

    cfg: LlmConfig

    def setup(self) -> None:
        c = self.cfg
        _remat_policy(c.remat_policy)  # fail early on a bad name
        self.embed_tokens = VocabParam(c.vocab_size, c.hidden_size, jnp.dtype(c.param_dtype))
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

    def _unrolled(
        self, name: str, n: int, offset: int, x, positions, cache, attend_cache, seed_at=-1,
        segment_ids=None, causal_by_index=False,
    ):  # fmt: skip
        """Layers `{name}_{j}`, j < n -> (x, output of layer seed_at, kv, per-layer outputs).

        kv: the updated cache, or without one this stack's fresh (k, v) stacked [n, B, T, K, H].
        """
        policy = _remat_policy(self.cfg.remat_policy)
        cls = DecoderLayer
        if policy is not None:  # self=0, x, positions, cache, layer=4, attend_cache=5
            cls = nn.remat(DecoderLayer, policy=policy, static_argnums=(4, 5))
        kvs, outs, seed = [], [], None
        for j in range(n):
            x, kv = cls(self.cfg, causal_by_index, name=f"{name}_{j}")(
                x, positions, cache, offset + j, attend_cache, segment_ids
            )
            if cache is not None:
                cache = kv
            else:
                kvs.append(kv)
            outs.append(x)
            if j == seed_at:
                seed = x
        if cache is None:
            cache = tuple(jnp.stack([kv[i] for kv in kvs]) for i in (0, 1))
        return x, seed, cache, outs

    def _scanned(
        self, name: str, n: int, offset: int, x, positions, cache, attend_cache, collect,
        seed_at=-1, segment_ids=None, causal_by_index=False,
    ):  # fmt: skip
        """`nn.scan` over the stacked layers `name`; same returns as `_unrolled`."""
        policy = _remat_policy(self.cfg.remat_policy)
        step = ScanStep
        if policy is not None:
            step = nn.remat(ScanStep, policy=policy, prevent_cse=False)
        stack = nn.scan(
            step,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=n,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        module = stack(
            self.cfg, causal_by_index, cache_offset=offset, seed_at=seed_at,
            attend_cache=attend_cache, collect=collect, name=name,
        )  # fmt: skip
        (x, seed, cache_out), (fresh, outs) = module(
            (x, x, cache), jnp.arange(n, dtype=jnp.int32), positions, segment_ids
        )
        return x, seed, cache_out if cache is not None else fresh, list(outs) if collect else []

    @nn.compact
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
        audio_branch: jax.Array | None = None,
        causal_by_index: bool = False,
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
          segment_ids: [B, T] packed-example ids (training rows, no cache): attention stays
            within equal ids; positions restart per example.
          causal_by_index: (no cache) mask by key index <= query index (and segment ids)
            instead of by positions, so the fused attention kernels can run
            (`cfg.attention_implementation`). The caller guarantees that positions strictly
            increase along the row within each segment, which makes the two masks equal
            (training rows: `training.train_step.check_positions`).
          audio_branch: bool scalar (training, no cache): False skips the MIMO layers at run
            time (`nn.cond`): the audio branch's outputs (hidden states, audio logits, its k/v)
            are then zeros and nothing flows back through it. None always runs it.
        Returns:
          LlmOutput with fp32 text and audio logits and the updated cache (without `cache`: a
          cache holding this call's k/v of every layer, length T).
        """
        c = self.cfg
        if causal_by_index and cache is not None:
            raise ValueError("KimiaLLM: causal_by_index is for calls without a cache (training)")
        x, aux = self.embed(audio_ids, text_ids, features, continuous_mask)
        if collect:
            aux["inputs_embeds"] = x
        n, nm, seed_at = (
            c.num_hidden_layers,
            c.kimia_mimo_layers,
            c.kimia_mimo_transformer_from_layer_index,
        )
        if audio_branch is not None and cache is not None:
            raise ValueError("KimiaLLM: audio_branch needs cache=None (training forward)")
        if c.scan_layers:
            x, m, kv_main, main_outs = self._scanned(
                "layers", n, 0, x, positions, cache, attend_cache, collect, seed_at,
                segment_ids=segment_ids, causal_by_index=causal_by_index,
            )  # fmt: skip
        else:
            x, m, kv_main, main_outs = self._unrolled(
                "layers", n, 0, x, positions, cache, attend_cache, seed_at,
                segment_ids=segment_ids, causal_by_index=causal_by_index,
            )  # fmt: skip

        # the un-normalised residual stream of layer seed_at seeds the MIMO branch (§3.4)
        def mimo(mdl: KimiaLLM, m: jax.Array) -> tuple[jax.Array, Any, list[jax.Array]]:
            args = ("mimo_layers", nm, n, m, positions, kv_main if cache is not None else None)
            kw = dict(segment_ids=segment_ids, causal_by_index=causal_by_index)
            if c.scan_layers:
                m, _, kv, outs = mdl._scanned(*args, attend_cache, collect, **kw)
            else:
                m, _, kv, outs = mdl._unrolled(*args, attend_cache, **kw)
            return m, kv, outs

        if audio_branch is None:
            m, kv_all, mimo_outs = mimo(self, m)
        else:  # run-time skip; its k/v (unused in training) are zeros either way

            def run(mdl: KimiaLLM, m: jax.Array) -> tuple[jax.Array, jax.Array | None]:
                m, _, outs = mimo(mdl, m)
                return m, jnp.stack(outs) if collect else None

            def skip(mdl: KimiaLLM, m: jax.Array) -> tuple[jax.Array, jax.Array | None]:
                return jnp.zeros_like(m), jnp.zeros((nm, *m.shape), m.dtype) if collect else None

            m, outs = nn.cond(audio_branch, run, skip, self, m)
            mimo_outs = list(outs) if collect else []
            kv_all = tuple(jnp.zeros((nm, *k.shape[1:]), k.dtype) for k in kv_main)
        if cache is not None:
            new_cache = kv_all
        else:  # this call's k/v of every layer, main then MIMO
            k, v = (jnp.concatenate([kv_main[i], kv_all[i]]) for i in (0, 1))
            new_cache = KVCache(k=k, v=v, length=jnp.full(k.shape[1:2], k.shape[2], jnp.int32))
        if logits_at is not None:
            take = jax.vmap(lambda h, i: jax.lax.dynamic_slice_in_dim(h, i, 1, axis=0))
            x, m = take(x, logits_at), take(m, logits_at)
        h_text, h_audio = self.norm(x), self.mimo_norm(m)
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
        return LlmOutput(
            text_logits=text_logits, audio_logits=audio_logits, cache=new_cache, aux=aux
        )


# --- parameter layouts: unrolled (`layers_<i>`) <-> stacked (`layers` with a leading axis) ---

_STACKS = (("layers", "num_hidden_layers"), ("mimo_layers", "kimia_mimo_layers"))
STACK_NAMES = tuple(name for name, _ in _STACKS)
"""Keys of the stacked layer trees (`scan_layers`): their leaves have a leading layer axis."""


def stack_layers(params: Any, cfg: LlmConfig) -> dict[str, Any]:
    """Unrolled tree (`layers_<i>/...`) -> stacked (`layers/...` [L, ...]); other entries kept."""
    out = dict(params)
    for name, attr in _STACKS:
        n = getattr(cfg, attr)
        keys = [f"{name}_{i}" for i in range(n)]
        missing = [k for k in keys if k not in out]
        if missing:
            raise KeyError(f"stack_layers: unrolled params lack {missing}")
        out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *(out.pop(k) for k in keys))
    return out


def unstack_layers(params: Any, cfg: LlmConfig) -> dict[str, Any]:
    """Stacked tree (`layers/...` [L, ...]) -> unrolled (`layers_<i>/...`); inverse of stack."""
    out = dict(params)
    for name, attr in _STACKS:
        n = getattr(cfg, attr)
        if name not in out:
            raise KeyError(f"unstack_layers: params lack the stacked {name!r}")
        stacked = out.pop(name)
        for i in range(n):
            out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def to_layout(params: Any, cfg: LlmConfig, mesh: Any = None) -> dict[str, Any]:
    """`params` in either layout -> the layout of `cfg.scan_layers`.

    With a mesh, converted leaves are placed by the target layout's logical axes (the stacked
    layer axis is replicated).
    """
    stacked = "layers" in params
    if stacked == cfg.scan_layers:
        return params
    out = stack_layers(params, cfg) if cfg.scan_layers else unstack_layers(params, cfg)
    if mesh is not None:
        shardings = sharding.shardings_for(abstract_params(cfg), mesh)
        out = jax.device_put(out, quant.shardings_like(shardings, out))
    return out


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

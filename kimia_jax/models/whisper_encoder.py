"""Whisper encoders in Flax: the whisper-large-v3 encoder (continuous features) and GLM-4-Voice's
`WhisperVQEncoder` (discrete tokens). Spec: /work/shared/spec/audio_tokenizer.md sections 4-5.

Both share the pre-LN encoder layer (LayerNorm eps 1e-5, k_proj without bias, q scaled by
head_dim^-0.5 before the dot, exact erf GELU). They differ in the conv front end (symmetric
padding 1 vs causal left padding 2), the attention mask (none vs block-causal + key padding), the
final LayerNorm (whisper only) and the pooling + VQ stage (GLM only). Attention, LayerNorm and the
projections are the shared layers (`layers.attention.dot_product_attention` with an
`AttentionMask`, `layers.norm.LayerNorm`, `layers.linear.Linear`).

Parameter paths mirror the Hugging Face names and layouts: `front/conv1/kernel` ([3, in, out]),
`layers_3/self_attn/q_proj/weight` ([out, in], as HF), `layers_3/final_layer_norm/weight`,
`embed_positions`, `codebook`, ...
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimia_jax.configs import WhisperConfig  # re-exported: the config lives in kimia_jax.configs
from kimia_jax.layers.attention import AttentionMask, dot_product_attention
from kimia_jax.layers.linear import Linear
from kimia_jax.layers.norm import LayerNorm
from kimia_jax.layers.remat import remat_policy

_HI = jax.lax.Precision.HIGHEST


def _linear(n: int, axes: tuple[str, str], name: str, use_bias: bool, dtype: Any) -> Linear:
    """Linear with the HF [out, in] weight; axes are the logical names of (out, in)."""
    return Linear(n, axes, use_bias=use_bias, dtype=dtype, name=name)


def _layer_norm(name: str, dtype: Any) -> LayerNorm:
    return LayerNorm(eps=1e-5, dtype=dtype, name=name)  # torch default eps


class SelfAttention(nn.Module):
    """Whisper self-attention (twin of `WhisperAttention`): q scaled before the dot, no k bias."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask | None) -> jax.Array:
        """x [B, T, D]; mask: which keys each query sees (None: full attention)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        b, t, d = x.shape
        h, k = cfg.encoder_attention_heads, cfg.head_dim
        q = _linear(d, ("heads", "embed"), "q_proj", True, dt)(x) * (k**-0.5)
        kk = _linear(d, ("heads", "embed"), "k_proj", False, dt)(x)
        v = _linear(d, ("heads", "embed"), "v_proj", True, dt)(x)
        q, kk, v = (a.reshape(b, t, h, k) for a in (q, kk, v))  # [B, T, N, H]
        o = dot_product_attention(
            q, kk, v, mask=mask, scale=1.0, q_chunk=cfg.attention_chunk, precision=_HI
        )
        return _linear(d, ("embed", "heads"), "out_proj", True, dt)(o.reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer (twin of `WhisperEncoderLayer` / `WhisperVQEncoderLayer`)."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: AttentionMask | None) -> jax.Array:  # [B, T, D]
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = x + SelfAttention(cfg, name="self_attn")(
            _layer_norm("self_attn_layer_norm", dt)(x), mask
        )
        h = _layer_norm("final_layer_norm", dt)(x)
        h = jax.nn.gelu(
            _linear(cfg.encoder_ffn_dim, ("mlp", "embed"), "fc1", True, dt)(h), approximate=False
        )
        return x + _linear(cfg.d_model, ("embed", "mlp"), "fc2", True, dt)(h)


class ConvFrontEnd(nn.Module):
    """gelu(conv1) -> gelu(conv2, stride 2) -> + positions. mel [B, M, T] -> [B, T/2, D]."""

    cfg: WhisperConfig
    causal: bool

    @nn.compact
    def __call__(self, mel: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        # CausalConv1d ignores its padding=1 and left-pads dilation*(k-1) = 2 (spec 4.3 step 1)
        pad = ((2, 0),) if self.causal else ((1, 1),)

        def conv(n: int, stride: int, axes: tuple[str, str, str], name: str) -> nn.Conv:
            return nn.Conv(
                n,
                (3,),
                strides=(stride,),
                padding=pad,
                dtype=dt,
                precision=_HI,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[2],)),
                name=name,
            )

        x = jnp.swapaxes(mel, 1, 2).astype(dt)  # [B, T, M]
        x = jax.nn.gelu(
            conv(cfg.d_model, 1, ("kernel_w", "mel", "embed"), "conv1")(x), approximate=False
        )
        x = jax.nn.gelu(
            conv(cfg.d_model, 2, ("kernel_w", "conv_in", "embed"), "conv2")(x), approximate=False
        )
        return x


def _positions(module: nn.Module, name: str, rows: int, d: int) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
    return module.param(name, init, (rows, d), jnp.float32)


class WhisperEncoder(nn.Module):
    """whisper-large-v3 encoder (twin of transformers `WhisperEncoder`): full attention, final LN"""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, mel: jax.Array) -> jax.Array:
        """mel [B, 128, 3000] -> last_hidden_state [B, 1500, D] (float32)."""
        cfg = self.cfg
        x = ConvFrontEnd(cfg, causal=False, name="front")(mel)
        pos = _positions(self, "embed_positions", cfg.max_source_positions, cfg.d_model)
        if x.shape[1] != pos.shape[0]:
            raise ValueError(
                f"whisper encoder needs {2 * pos.shape[0]} mel frames, got {mel.shape[2]}"
            )
        x = x + pos.astype(x.dtype)
        policy = remat_policy(cfg.remat_policy)
        layer = EncoderLayer if policy is None else nn.remat(EncoderLayer, policy=policy)
        for i in range(cfg.encoder_layers):  # remat: same param paths, layers_{i}
            x = layer(cfg, name=f"layers_{i}")(x, None)
        return _layer_norm("layer_norm", jnp.dtype(cfg.dtype))(x).astype(jnp.float32)


def vq_attention_mask(valid: jax.Array, block: int | None) -> AttentionMask:
    """GLM-4 mask (spec 4.4): key j visible to query i iff j valid and (j <= i or same block).

    valid [B, T] bool (frames inside the clip); block None: key padding only.
    """
    pad = AttentionMask.make_padding(valid)
    return pad if block is None else AttentionMask.make_block_causal(block) & pad


class WhisperVQEncoder(nn.Module):
    """GLM-4-Voice tokenizer (twin of `WhisperVQEncoder`, encoder-only): mel -> ids at 12.5 Hz."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, mel: jax.Array, frame_mask: jax.Array) -> dict[str, jax.Array]:
        """Runs the tokenizer.

        Args:
          mel: float32 [B, 128, T] (T a multiple of 8).
          frame_mask: [B, T] int/bool, 1 for frames with 160 t < L (feature_attention_mask).
        Returns:
          dict with prequant [B, T/8, D], distances [B, T/8, V], ids int32 [B, T/8],
          pooled_valid_mask bool [B, T/8], last_hidden_state [B, T/8, D].
        """
        cfg = self.cfg
        pk = cfg.pooling_kernel_size
        x = ConvFrontEnd(cfg, causal=cfg.encoder_causal_convolution, name="front")(mel)
        t50 = x.shape[1]
        pos = _positions(self, "embed_positions", cfg.max_source_positions, cfg.d_model)
        x = x + pos[:t50].astype(x.dtype)
        valid = frame_mask[:, ::2].astype(bool)  # conv1 stride 1 x conv2 stride 2
        block = cfg.quantize_causal_block_size
        mask = vq_attention_mask(valid, block)
        out: dict[str, jax.Array] = {}
        for i in range(cfg.quantize_position):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, mask)
            if i + 1 == cfg.pooling_position:
                if x.shape[1] % pk:  # reference right-pads with zeros and still divides by pk
                    x = jnp.pad(x, ((0, 0), (0, pk - x.shape[1] % pk), (0, 0)))
                grouped = x.reshape(x.shape[0], x.shape[1] // pk, pk, x.shape[2])
                x = grouped.mean(axis=2) if cfg.pooling_type == "avg" else grouped.max(axis=2)
                valid = valid[:, ::pk]
                mask = vq_attention_mask(valid, None if block is None else block // pk)
        prequant = x.astype(jnp.float32)  # [B, T/8, D]
        codebook = self.param(
            "codebook",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebook", "embed")),
            (cfg.quantize_vocab_size, cfg.d_model),
            jnp.float32,
        )
        # Reference distance form (torch.addmm): (|c|^2 + |x|^2) - 2 x.c, in float32 (spec 4.5).
        c_sq = jnp.sum(codebook**2, axis=1)
        x_sq = jnp.sum(prequant**2, axis=-1, keepdims=True)
        dots = jnp.einsum("btd,vd->btv", prequant, codebook, precision=_HI)
        distances = (c_sq + x_sq) - 2.0 * dots
        ids = jnp.argmin(distances, axis=-1).astype(
            jnp.int32
        )  # first minimum on ties, as torch.min
        pos2 = _positions(self, "embed_positions2", -(-cfg.max_source_positions // pk), cfg.d_model)
        out.update(
            prequant=prequant,
            distances=distances,
            ids=ids,
            pooled_valid_mask=valid,
            last_hidden_state=codebook[ids] + pos2[: ids.shape[1]],
        )
        return out


def abstract_params(cfg: WhisperConfig, frames: int = 3000) -> Any:
    """Boxed abstract param tree (for shardings and conversion targets), without allocating."""
    mel = jax.ShapeDtypeStruct((1, cfg.num_mel_bins, frames), jnp.float32)
    if cfg.is_vq:
        model: nn.Module = WhisperVQEncoder(cfg)
        mask = jax.ShapeDtypeStruct((1, frames), jnp.int32)
        return jax.eval_shape(model.init, jax.random.key(0), mel, mask)["params"]
    return jax.eval_shape(WhisperEncoder(cfg).init, jax.random.key(0), mel)["params"]


def init_params(cfg: WhisperConfig, seed: int = 0) -> Any:
    """Random params (unboxed), for benchmarks and tests."""
    frames = 16 if cfg.is_vq else 2 * cfg.max_source_positions
    mel = jnp.zeros((1, cfg.num_mel_bins, frames), jnp.float32)
    if cfg.is_vq:
        v = WhisperVQEncoder(cfg).init(jax.random.key(seed), mel, jnp.ones((1, frames), jnp.int32))
    else:
        v = WhisperEncoder(cfg).init(jax.random.key(seed), mel)
    return nn.unbox(v["params"])


__all__ = [
    "WhisperConfig",
    "WhisperEncoder",
    "WhisperVQEncoder",
    "abstract_params",
    "vq_attention_mask",
    "init_params",
]

"""Whisper encoders in Flax: the whisper-large-v3 encoder (continuous features) and GLM-4-Voice's
`WhisperVQEncoder` (discrete tokens). Spec: /work/shared/spec/audio_tokenizer.md sections 4-5.

Both share the pre-LN encoder layer (LayerNorm eps 1e-5, k_proj without bias, q scaled by
head_dim^-0.5 before the dot, exact erf GELU). They differ in the conv front end (symmetric
padding 1 vs causal left padding 2), the attention mask (none vs block-causal + key padding), the
final LayerNorm (whisper only) and the pooling + VQ stage (GLM only).

Parameter paths mirror the Hugging Face names: `conv1/kernel`, `layers_3/self_attn/q_proj/kernel`,
`embed_positions`, `codebook`, ...
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimia_jax.configs import WhisperConfig  # re-exported: the config lives in kimia_jax.configs

_HI = jax.lax.Precision.HIGHEST


def _dense(n: int, axes: tuple[str, str], name: str, use_bias: bool, dtype: Any) -> nn.Dense:
    return nn.Dense(
        n,
        use_bias=use_bias,
        dtype=dtype,
        precision=_HI,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-5,  # torch default; flax's is 1e-6
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class SelfAttention(nn.Module):
    """Whisper self-attention (twin of `WhisperAttention`): q scaled before the dot, no k bias."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
        """x [B, T, D]; allowed bool [B, T, T] (query, key) or None (full attention)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        b, t, d = x.shape
        h, k = cfg.encoder_attention_heads, cfg.head_dim
        q = _dense(d, ("embed", "heads"), "q_proj", True, dt)(x) * (k**-0.5)
        kk = _dense(d, ("embed", "heads"), "k_proj", False, dt)(x)
        v = _dense(d, ("embed", "heads"), "v_proj", True, dt)(x)
        q, kk, v = (a.reshape(b, t, h, k) for a in (q, kk, v))  # [B, T, N, H]
        o = attention(q, kk, v, allowed, self.cfg.attention_chunk).reshape(b, t, d)
        return _dense(d, ("heads", "embed"), "out_proj", True, dt)(o)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """Softmax attention. q [B, C, N, H], k/v [B, T, N, H], allowed [B, C, T] -> [B, C, N, H]."""
    s = jnp.einsum("bqnh,bknh->bnqk", q, k, precision=_HI).astype(jnp.float32)
    if allowed is not None:
        # the reference adds finfo(f32).min to masked scores; a where gives the same softmax
        s = jnp.where(allowed[:, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", p, v, precision=_HI)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None, chunk: int | None
) -> jax.Array:
    """Exact softmax attention. q/k/v [B, T, N, H], allowed bool [B, T, T] or None -> [B, T, N, H].

    With `chunk` on the CPU backend the work is looped over (batch, head, query chunk) so each
    [chunk, T] score block stays in cache: XLA:CPU's head-batched dots over the full 1500 x 1500
    scores were 7x slower than this loop (2x slower than torch's fused SDPA) on 2 cores. On
    accelerators (or chunk=None) it is one batched einsum. Same math row by row either way.
    """
    b, t, n, h = q.shape
    if not chunk or t <= chunk or jax.default_backend() != "cpu":
        return _attend(q, k, v, allowed)
    nc = -(-t // chunk)
    pad = nc * chunk - t
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nc, chunk, n, h)
    qc = qc.transpose(0, 3, 1, 2, 4)  # [B, N, nc, C, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, N, T, H]
    if allowed is None:
        allowed = jnp.ones((b, 1, 1), bool)  # broadcast: every key visible
        ac = jnp.broadcast_to(allowed[:, None], (b, nc, 1, 1))
    else:
        ac = jnp.pad(allowed, ((0, 0), (0, pad), (0, 0)), constant_values=True)
        ac = ac.reshape(b, nc, chunk, t)  # [B, nc, C, T]

    qf = qc.reshape(b * n * nc, -1, h)  # item i = (batch, head, chunk) in row-major order
    kf, vf = kt.reshape(b * n, t, h), vt.reshape(b * n, t, h)
    af = ac.reshape(b * nc, *ac.shape[2:])

    def item(xs: tuple[jax.Array, jax.Array]) -> jax.Array:
        qq, i = xs  # [C, H], scalar index
        bn, c = i // nc, i % nc
        kk, vv, aa = kf[bn], vf[bn], af[(bn // n) * nc + c]
        s = jnp.dot(qq, kk.T, precision=_HI).astype(jnp.float32)  # [C, T]
        s = jnp.where(aa, s, jnp.finfo(jnp.float32).min)
        return jnp.dot(jax.nn.softmax(s, axis=-1).astype(vv.dtype), vv, precision=_HI)

    # One flat loop (not nested maps): same speed, much faster to compile.
    out = jax.lax.map(item, (qf, jnp.arange(b * n * nc)))  # [B*N*nc, C, H]
    out = out.reshape(b, n, nc, chunk, h)
    return out.transpose(0, 2, 3, 1, 4).reshape(b, nc * chunk, n, h)[:, :t]


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer (twin of `WhisperEncoderLayer` / `WhisperVQEncoderLayer`)."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:  # [B, T, D]
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = x + SelfAttention(cfg, name="self_attn")(
            _layer_norm("self_attn_layer_norm", dt)(x), allowed
        )
        h = _layer_norm("final_layer_norm", dt)(x)
        h = jax.nn.gelu(
            _dense(cfg.encoder_ffn_dim, ("embed", "mlp"), "fc1", True, dt)(h), approximate=False
        )
        return x + _dense(cfg.d_model, ("mlp", "embed"), "fc2", True, dt)(h)


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
        for i in range(cfg.encoder_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, None)
        return _layer_norm("layer_norm", jnp.dtype(cfg.dtype))(x).astype(jnp.float32)


def block_causal_allowed(valid: jax.Array, block: int) -> jax.Array:
    """GLM-4 mask (spec 4.4): (j <= i or same block) and key j valid. valid [B, T] -> [B, T, T]."""
    t = valid.shape[1]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    pattern = (j <= i) | (i // block == j // block)
    return pattern[None] & valid[:, None, :].astype(bool)


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

        def mask_for(v: jax.Array, blk: int | None) -> jax.Array:
            if blk is None:
                return jnp.broadcast_to(v[:, None, :], (v.shape[0], v.shape[1], v.shape[1]))
            return block_causal_allowed(v, blk)

        allowed = mask_for(valid, block)
        out: dict[str, jax.Array] = {}
        for i in range(cfg.quantize_position):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, allowed)
            if i + 1 == cfg.pooling_position:
                if x.shape[1] % pk:  # reference right-pads with zeros and still divides by pk
                    x = jnp.pad(x, ((0, 0), (0, pk - x.shape[1] % pk), (0, 0)))
                grouped = x.reshape(x.shape[0], x.shape[1] // pk, pk, x.shape[2])
                x = grouped.mean(axis=2) if cfg.pooling_type == "avg" else grouped.max(axis=2)
                valid = valid[:, ::pk]
                allowed = mask_for(valid, None if block is None else block // pk)
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
    "block_causal_allowed",
    "init_params",
]

"""Flow-matching DiT of the Kimi-Audio detokenizer (twin of the official `DiTPrefix`).

A velocity field v(x_t, tokens, t) over normalized 80-bin log-mel frames. Conditioning is per
frame (adaLN driven by token embedding + timestep embedding), attention is bidirectional over a
per-layer K/V cache of committed frames plus the current chunk, with interleaved-pair RoPE applied
before caching. See spec/detokenizer.md §2.

Shapes: B batch, L frames of the current chunk, S cached frames, D hidden, N heads, H head dim,
M mel bins (80).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import DiTConfig  # re-exported: the config lives in kimia_jax.configs

_FREQ_EMB = 256  # TimestepEmbedder frequency_embedding_size (official default, no config key)
_LN_EPS = 1e-6


def _dense(features: int, axes: tuple[str | None, str | None], name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        precision=None,
        name=name,
    )


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm over the last axis, no affine, eps 1e-6, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + _LN_EPS)).astype(x.dtype)


def timestep_frequencies() -> np.ndarray:
    """f_i = exp(-ln(10000) i / 128) as the official float32 computation (spec §2.3)."""
    half = _FREQ_EMB // 2
    arg = (np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    return np.exp(arg.astype(np.float64)).astype(np.float32)


def rope_inverse_frequencies(cfg: DiTConfig) -> np.ndarray:
    """theta_j = base^(-2j/H) / interpolation, float32 (spec §2.4)."""
    hd = cfg.head_dim
    expo = np.arange(0, hd, 2, dtype=np.float32)[: hd // 2] / np.float32(hd)
    theta = (1.0 / (np.float64(np.float32(cfg.rope_base)) ** expo.astype(np.float64))).astype(
        np.float32
    )
    return theta


def apply_rope(x: jax.Array, positions: jax.Array, theta: jax.Array, interp: float) -> jax.Array:
    """Interleaved-pair (complex) rotary embedding in float32.  x [B, L, N, H], positions [B, L]."""
    pos = positions.astype(jnp.float32)
    if interp != 1.0:
        pos = pos / jnp.float32(interp)
    ang = pos[:, :, None] * theta[None, None, :]  # [B, L, H/2]; same float32 product as torch.outer
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class TimestepEmbedder(nn.Module):
    """Integer timestep -> [B, D]: cat(cos, sin) of t*f, then Linear-SiLU-Linear (`t_embedder`)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:  # [B] int -> [B, D]
        freqs = jnp.asarray(timestep_frequencies())
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        dt = jnp.dtype(self.cfg.dtype)
        h = _dense(self.cfg.hidden_size, (None, "embed"), "mlp_0", dt)(emb.astype(dt))
        return _dense(self.cfg.hidden_size, ("embed", "mlp"), "mlp_2", dt)(nn.silu(h))


class Attention(nn.Module):
    """Fused qkv, RoPE, non-causal attention over [cache ; current], output projection."""

    cfg: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, L, D]
        positions: jax.Array,  # [B, L]
        cache_k: jax.Array,  # [B, S, N, H]
        cache_v: jax.Array,  # [B, S, N, H]
        key_mask: jax.Array,  # [B, S + L] bool: which keys exist (valid cache, unpadded frames)
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, ln, d = x.shape
        n, hd = cfg.num_heads, cfg.head_dim
        dt = jnp.dtype(cfg.dtype)
        qkv = _dense(3 * d, ("embed", "mlp"), "qkv", dt)(x)  # [B, L, 3D]: [q ; k ; v], head-major
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, ln, n, hd) for i in range(3))
        if cfg.use_rope:
            theta = jnp.asarray(rope_inverse_frequencies(cfg))
            q = apply_rope(q, positions, theta, cfg.rope_interpolation_factor)
            k = apply_rope(k, positions, theta, cfg.rope_interpolation_factor)
        keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)  # [B, S+L, N, H]
        vals = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
        logits = jnp.einsum("blnh,bsnh->bnls", q, keys, preferred_element_type=jnp.float32)
        logits = logits * jnp.float32(hd**-0.5)
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("bnls,bsnh->blnh", probs.astype(vals.dtype), vals).reshape(b, ln, d)
        return _dense(d, ("mlp", "embed"), "proj", dt)(o), k, v


class Mlp(nn.Module):
    """timm Mlp: fc2(GELU_tanh(fc1(x)))."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        h = _dense(self.cfg.mlp_hidden, ("embed", "mlp"), "fc1", dt)(x)
        h = nn.gelu(h, approximate=True)
        return _dense(self.cfg.hidden_size, ("mlp", "embed"), "fc2", dt)(h)


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulation (shift, scale, gate) x (msa, mlp) from SiLU(c)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, c, positions, cache_k, cache_v, key_mask):
        d = self.cfg.hidden_size
        dt = jnp.dtype(self.cfg.dtype)
        mod = _dense(6 * d, ("embed", "mlp"), "adaLN_modulation_1", dt)(nn.silu(c))
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = jnp.split(mod, 6, axis=-1)
        u = _layer_norm(x) * (1 + sc_msa) + sh_msa
        a, k, v = Attention(self.cfg, name="attn")(u, positions, cache_k, cache_v, key_mask)
        x = x + g_msa * a
        u = _layer_norm(x) * (1 + sc_mlp) + sh_mlp
        x = x + g_mlp * Mlp(self.cfg, name="mlp")(u)
        return x, k, v


class FlowDiT(nn.Module):
    """DiTPrefix forward: (x_t, tokens, integer t, positions, K/V cache) -> (velocity, new K/V).

    Returns:
      out: [B, L, M] velocity; k, v: [depth, B, L, N, H] this call's post-RoPE keys/values (the
      caller decides whether to commit them to the cache).
    """

    cfg: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, L, M] normalized mel state
        condition: jax.Array,  # [B, L] int token ids at the mel frame rate
        t: jax.Array,  # [B] int timesteps floor(1000 t)
        positions: jax.Array,  # [B, L] absolute frame positions
        cache_k: jax.Array,  # [depth, B, S, N, H]
        cache_v: jax.Array,  # [depth, B, S, N, H]
        key_mask: jax.Array,  # [B, S + L] bool
        return_hidden: bool = False,
    ):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        emb = nn.Embed(
            cfg.semantic_vocab_size + 1,
            cfg.hidden_size,
            dtype=dt,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="semantic_token_embedding",
        )
        cond = emb(condition)  # [B, L, D]
        h = _dense(cfg.hidden_size, ("mel", "embed"), "input_linear", dt)(x.astype(dt))
        temb = TimestepEmbedder(cfg, name="t_embedder")(t)  # [B, D]
        c = temb[:, None, :] + cond  # per-frame conditioning
        hidden = {"input_linear": h, "t_emb": temb}
        ks, vs = [], []
        for i in range(cfg.depth):  # unrolled: faster than scan for inference (perf-notes.md)
            h, k, v = DiTBlock(cfg, name=f"blocks_{i}")(
                h, c, positions, cache_k[i], cache_v[i], key_mask
            )
            hidden[f"block{i}_out"] = h
            ks.append(k)
            vs.append(v)
        out = _FinalLayer(cfg, name="final_layer")(h, c).astype(jnp.float32)
        if return_hidden:
            return out, jnp.stack(ks), jnp.stack(vs), hidden
        return out, jnp.stack(ks), jnp.stack(vs)


class _FinalLayer(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        d = self.cfg.hidden_size
        dt = jnp.dtype(self.cfg.dtype)
        mod = _dense(2 * d, ("embed", "mlp"), "adaLN_modulation_1", dt)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)  # shift first (spec §2.6)
        u = _layer_norm(x) * (1 + scale) + shift
        return _dense(self.cfg.input_size, ("embed", "mel"), "linear", dt)(u)

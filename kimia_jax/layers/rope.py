"""Rotary position embedding, non-interleaved "rotate half" (spec/llm.md §3.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2j/hd) in fp32, computed as the reference does (int arange -> float32 / hd)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def cos_sin(
    positions: jax.Array, head_dim: int, theta: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, hd] for integer positions [B, T]; fp32 table values cast to `dtype`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(head_dim, theta))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, hd]; cos/sin [B, T, hd]. x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]

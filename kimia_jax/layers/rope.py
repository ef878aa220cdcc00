"""Rotary position embedding: the LLM's "rotate half" and the DiT's interleaved pairs.

Both rotate channel pairs by angle position * inv_freq[j]; they differ in which channels pair up
and in how the reference computes the frequency table:
  * Qwen2 (spec/llm.md §3.3): pairs (j, j + H/2) ("rotate half"), inv_freq = 1 / theta^(2j/H) in
    float32, cos/sin tables cast to the compute dtype.
  * DiT (spec/detokenizer.md §2.4): pairs (2j, 2j + 1) (complex multiply), inv_freq computed in
    float64 from the float32 exponent and cast to float32, positions divided by an interpolation
    factor, the rotation in float32.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np


def inv_freq(
    head_dim: int, theta: float, table_dtype: Literal["float32", "float64"] = "float32"
) -> np.ndarray:
    """1 / theta^(2j/H), j < H/2, as float32, exactly as the reference computes it.

    The exponent 2j/H is always float32 (int arange -> float32 / H). `table_dtype` is the dtype of
    the power: "float32" (Qwen2: `1.0 / theta ** exponent` on float32 tensors) or "float64" (the
    DiT: numpy float64 power of float32(theta), then cast).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    if table_dtype == "float32":
        return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if table_dtype == "float64":
        base = np.float64(np.float32(theta))
        return (1.0 / base ** exponent.astype(np.float64)).astype(np.float32)
    raise ValueError(f"table_dtype must be 'float32' or 'float64', got {table_dtype!r}")


def angles(
    positions: jax.Array, freqs: np.ndarray | jax.Array, interpolation: float = 1.0
) -> jax.Array:
    """[..., H/2] float32 angles (position / interpolation) * freqs for integer positions [...]."""
    pos = positions.astype(jnp.float32)
    if interpolation != 1.0:
        pos = pos / jnp.float32(interpolation)
    return pos[..., None] * jnp.asarray(freqs, jnp.float32)


def cos_sin(
    positions: jax.Array, head_dim: int, theta: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Rotate-half cos, sin [B, T, H] for integer positions [B, T]; float32 values cast to dtype."""
    freqs = angles(positions, inv_freq(head_dim, theta))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate half: x [B, T, N, H]; cos/sin [B, T, H]. x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def apply_interleaved(
    x: jax.Array, positions: jax.Array, freqs: np.ndarray | jax.Array, interpolation: float = 1.0
) -> jax.Array:
    """Interleaved pairs (x[2j], x[2j+1]) rotated as complex numbers, in float32.

    x [B, T, N, H], positions [B, T] -> [B, T, N, H] in x's dtype.
    """
    ang = angles(positions, freqs, interpolation)  # [B, T, H/2]: the float32 product torch.outer
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)

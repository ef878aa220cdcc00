"""Qwen2 attention (q/k/v bias, GQA, RoPE) over an optional static-shape KV cache.

Cache layout per layer: k, v [B, S, K, H] (K = KV heads, keys stored after RoPE, values raw), the
slot index equals the absolute position, so "key slot s is visible to a query at position p" is
just `s <= p` (spec/llm.md §3.2/§4: bottom-right aligned causal attention over the cache).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimia_jax import sharding
from kimia_jax.layers import rope
from kimia_jax.layers.linear import Linear

LayerKV = tuple[jax.Array, jax.Array]  # (k, v) each [B, S, K, H]


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new [B, T, K, H] into cache [B, S, K, H] at per-row offsets start [B].

    The caller guarantees start + T <= S (dynamic_update_slice would clamp silently).
    """
    upd = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (s, 0, 0)))
    return upd(cache, new.astype(cache.dtype), start.astype(jnp.int32))


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    dtype: jnp.dtype,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal GQA attention by positions.

    Args:
      q: [B, T, N, H] queries (after RoPE); k, v: [B, S, K, H].
      q_pos: [B, T] absolute positions of the queries; k_pos: [B, S] (or [1, S]) of the keys.
      segment_ids: [B, T] packed-example ids of queries and keys (self-attention, S == T), or None.
    Returns:
      [B, T, N, H]; key s is visible to query t iff k_pos[s] <= q_pos[t] (and, with segment_ids,
      both belong to the same packed example).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]: query head i uses KV head i // G
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(h)
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]  # [B, 1, 1, T, S]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, None, None, :] == segment_ids[:, None, None, :, None])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(dtype))
    return out.reshape(b, t, n, h)


class Attention(nn.Module):
    """Twin of Qwen2Attention (self_attn): q/k/v projections with bias, o_proj without."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T] int32
        cache: LayerKV | None = None,
        attend_cache: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV]:
        """Returns (output [B, T, D], kv). `segment_ids` [B, T]: packed rows (no cache).

        With `cache` the new k/v are written at `positions[:, 0]` and kv is the updated cache;
        without, kv is the fresh (k, v) of this call. `attend_cache` selects the keys: the whole
        cache (decode, or a prefill continuing a conversation) or only this call's tokens (a prefill
        from position 0, which avoids attending over the empty tail of a long cache).
        """
        b, t, d = x.shape
        n, kh, h = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear(n * h, ("heads", "embed"), use_bias=True, name="q_proj", **kw)(x)
        k = Linear(kh * h, ("kv_heads", "embed"), use_bias=True, name="k_proj", **kw)(x)
        v = Linear(kh * h, ("kv_heads", "embed"), use_bias=True, name="v_proj", **kw)(x)
        q = q.reshape(b, t, n, h)
        k = k.reshape(b, t, kh, h)
        v = v.reshape(b, t, kh, h)
        cos, sin = rope.cos_sin(positions, h, self.rope_theta, self.dtype)
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))

        if cache is not None:
            ck = write_cache(cache[0], k, positions[:, 0])
            cv = write_cache(cache[1], v, positions[:, 0])
            ck = sharding.constrain(
                ck, ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
            )
            cv = sharding.constrain(
                cv, ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
            )
            kv: LayerKV = (ck, cv)
        else:
            kv = (k, v)
        if attend_cache:
            if cache is None:
                raise ValueError("attend_cache=True needs a cache")
            k_pos = jnp.arange(kv[0].shape[1], dtype=jnp.int32)[None, :]
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) cannot attend over a cache")
            out = attend(q, kv[0], kv[1], positions, k_pos, self.dtype)
        else:
            out = attend(q, k, v, positions, positions, self.dtype, segment_ids)
        out = out.reshape(b, t, n * h)
        out = Linear(d, ("embed", "heads"), name="o_proj", **kw)(out)
        return out, kv

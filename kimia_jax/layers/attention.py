"""Qwen2 attention (q/k/v bias, GQA, RoPE) over an optional static-shape KV cache.

Cache: `kimia_jax.layers.kv_cache.KVCache`, per layer k, v [B, S, K, H] (K = KV heads, keys stored
after RoPE, values raw); the slot index equals the absolute position, so "key slot s is visible to
a query at position p" is just `s <= p` (spec/llm.md §3.2/§4: bottom-right aligned causal
attention over the cache).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kimia_jax import sharding
from kimia_jax.layers import rope
from kimia_jax.layers.kv_cache import KVCache
from kimia_jax.layers.linear import Linear

LayerKV = tuple[jax.Array, jax.Array]  # (k, v) each [B, S, K, H]


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, dtype: jnp.dtype
) -> jax.Array:
    """Causal GQA attention by positions.

    Args:
      q: [B, T, N, H] queries (after RoPE); k, v: [B, S, K, H].
      q_pos: [B, T] absolute positions of the queries; k_pos: [B, S] (or [1, S]) of the keys.
    Returns:
      [B, T, N, H]; key s is visible to query t iff k_pos[s] <= q_pos[t].
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]: query head i uses KV head i // G
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(h)
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(dtype))
    return out.reshape(b, t, n, h)


class Attention(nn.Module):
    """Twin of Qwen2Attention (self_attn): q/k/v projections with bias, o_proj without.

    The projections are tagged with `checkpoint_name` ("query_proj", "key_proj", "value_proj",
    "out_proj") for the remat policies of `kimia_jax.models.kimia_llm`.
    """

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
        cache: KVCache | None = None,
        layer: int | jax.Array = 0,
        attend_cache: bool = False,
    ) -> tuple[jax.Array, KVCache | LayerKV]:
        """Returns (output [B, T, D], kv).

        With `cache` the new k/v are written into its layer `layer` at `positions[:, 0]` and kv is
        the updated cache; without, kv is the fresh (k, v) of this call. `attend_cache` selects
        the keys: the whole cache (decode, or a prefill continuing a conversation) or only this
        call's tokens (a prefill from position 0, which avoids attending over the empty tail of a
        long cache).
        """
        b, t, d = x.shape
        n, kh, h = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear(n * h, ("heads", "embed"), use_bias=True, name="q_proj", **kw)(x)
        k = Linear(kh * h, ("kv_heads", "embed"), use_bias=True, name="k_proj", **kw)(x)
        v = Linear(kh * h, ("kv_heads", "embed"), use_bias=True, name="v_proj", **kw)(x)
        q = checkpoint_name(q, "query_proj").reshape(b, t, n, h)
        k = checkpoint_name(k, "key_proj").reshape(b, t, kh, h)
        v = checkpoint_name(v, "value_proj").reshape(b, t, kh, h)
        cos, sin = rope.cos_sin(positions, h, self.rope_theta, self.dtype)
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))

        kv: KVCache | LayerKV = (k, v)
        if cache is not None:
            kv = cache.update(layer, k, v, positions[:, 0]).constrain()
        if attend_cache:
            if cache is None:
                raise ValueError("attend_cache=True needs a cache")
            ck, cv = kv.layer(layer)
            k_pos = jnp.arange(ck.shape[1], dtype=jnp.int32)[None, :]
            out = attend(q, ck, cv, positions, k_pos, self.dtype)
        else:
            out = attend(q, k, v, positions, positions, self.dtype)
        out = out.reshape(b, t, n * h)
        out = Linear(d, ("embed", "heads"), name="o_proj", **kw)(out)
        return checkpoint_name(out, "out_proj"), kv

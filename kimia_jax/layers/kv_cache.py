"""The one static-shape K/V cache of the LLM and the DiT: keys and values stacked over layers.

    k, v    [L, B, S, K, H]  L layers, B rows, S slots (capacity), K KV heads, H head dim
    length  [B] int32        slots in use per row

Keys are stored after RoPE, values raw. Two ways of filling it:
  * `update` writes T new entries of one layer at per-row slots `start` (the LLM: slot = absolute
    position, attention masks by position, `length` is how far a row has been written);
  * `append` adds n new entries of every layer after `length` and keeps the last `max_length`,
    in a buffer of a given capacity (the DiT's sliding window of committed frames, which grows
    through capacity buckets).
Shapes never change inside a jitted function (only `append` may return a bigger capacity, a
static choice), so the cache is a plain pytree that can be donated and carried by loops.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from kimia_jax import sharding

# Logical axis names of k and v (kimia_jax.sharding.LOGICAL_RULES maps them to mesh axes).
AXES = ("cache_layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
LENGTH_AXES = ("cache_batch",)


@flax.struct.dataclass
class KVCache:
    """Static-shape K/V cache of L layers; see the module docstring for the layout."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    length: jax.Array  # [B] int32

    @classmethod
    def zeros(
        cls, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype: Any
    ) -> KVCache:
        """An empty cache (length 0) with distinct zero buffers for k and v (both donatable)."""
        shape = (num_layers, batch, capacity, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros(batch, jnp.int32)
        )

    @classmethod
    def logical_axes(cls) -> KVCache:
        """The same tree with each leaf's logical axis names (for `sharding` helpers)."""
        return cls(k=AXES, v=AXES, length=LENGTH_AXES)  # type: ignore[arg-type]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    # The LLM's name for the capacity (positions run up to it).
    max_length = capacity

    def layer(self, i: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        """(k, v) of layer i, each [B, S, K, H]; i may be traced (inside a scan over layers)."""
        take = lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)  # noqa: E731
        return take(self.k), take(self.v)

    def valid(self) -> jax.Array:
        """[B, S] bool: slot s of row b holds a written entry (s < length[b])."""
        return jnp.arange(self.capacity, dtype=jnp.int32)[None, :] < self.length[:, None]

    def constrain(self) -> KVCache:
        """Sharding constraint on k and v by their logical names (no-op without a mesh)."""
        return self.replace(k=sharding.constrain(self.k, AXES), v=sharding.constrain(self.v, AXES))

    def update(self, i: int | jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> KVCache:
        """Writes k, v [B, T, K, H] into layer i at slots start[b] .. start[b] + T - 1 of row b.

        The caller guarantees start + T <= capacity (slots past it are dropped, not written).
        `length` becomes max(length, start + T).
        """
        start = start.astype(jnp.int32)
        i = jnp.asarray(i, jnp.int32)

        b, t = k.shape[:2]
        # One scatter of B x T [K, H] windows into layer i (in place in a loop carry). A vmap of
        # dynamic_update_slice over the B axis of the stacked buffer instead transposes all L
        # layers around each write: two whole-cache copies per layer per decode step.
        rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
        slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

        def write(buf: jax.Array, new: jax.Array) -> jax.Array:
            return buf.at[i, rows, slots].set(new.astype(buf.dtype), mode="drop")

        return KVCache(
            k=write(self.k, k), v=write(self.v, v), length=jnp.maximum(self.length, start + t)
        )

    def append(
        self,
        k: jax.Array,
        v: jax.Array,
        n: jax.Array,
        *,
        max_length: int,
        capacity: int | None = None,
    ) -> KVCache:
        """Appends the first n[b] of T entries k, v [L, B, T, K, H] after each row's `length`.

        Keeps the last `max_length` entries of each row, left-aligned (a sliding window), in a
        buffer of `capacity` slots (static; default: the current one) that must hold
        min(length + n, max_length) entries. Slots past the new length are unspecified.
        """
        s, t = self.capacity, k.shape[2]
        capacity = s if capacity is None else capacity
        # length + T <= size, so the update never clamps; after a trim (total > max_length, hence
        # capacity == max_length) the window [total - max_length, total) lies inside the buffer.
        size = max(s + t, capacity)
        n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), self.length.shape)
        total = self.length + n
        shift = jnp.maximum(total - max_length, 0)

        def one(buf: jax.Array, new: jax.Array) -> jax.Array:
            def row(c, u, at, sh):  # c [L, S, K, H], u [L, T, K, H]
                tail = jnp.zeros((c.shape[0], size - s, *c.shape[2:]), c.dtype)
                c = jnp.concatenate([c, tail], axis=1)
                c = jax.lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), at, axis=1)
                return jax.lax.dynamic_slice_in_dim(c, sh, capacity, axis=1)

            return jax.vmap(row, in_axes=(1, 1, 0, 0), out_axes=1)(buf, new, self.length, shift)

        return KVCache(k=one(self.k, k), v=one(self.v, v), length=jnp.minimum(total, max_length))

    def resized(self, capacity: int) -> KVCache:
        """The same entries in a buffer of `capacity` >= the current one (zero slots appended)."""
        pad = ((0, 0), (0, 0), (0, capacity - self.capacity), (0, 0), (0, 0))
        return self.replace(k=jnp.pad(self.k, pad), v=jnp.pad(self.v, pad))

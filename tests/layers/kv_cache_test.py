"""KVCache: layout, per-row writes (LLM) and sliding-window appends (DiT), with marked values."""

import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.layers.kv_cache import AXES, KVCache


def _marked(layers: int, batch: int, t: int, base: float) -> jax.Array:
    """[layers, batch, t, 1, 1] with value base + 100 * layer + 10 * row + slot."""
    ly, b, s = np.meshgrid(np.arange(layers), np.arange(batch), np.arange(t), indexing="ij")
    return jnp.asarray((base + 100 * ly + 10 * b + s)[..., None, None], jnp.float32)


def test_zeros_layout_and_axes():
    c = KVCache.zeros(3, 2, 5, 4, 8, jnp.bfloat16)
    assert c.k.shape == c.v.shape == (3, 2, 5, 4, 8) and c.k.dtype == jnp.bfloat16
    assert (c.num_layers, c.batch_size, c.capacity, c.max_length) == (3, 2, 5, 5)
    np.testing.assert_array_equal(c.length, [0, 0])
    assert c.k is not c.v  # both donatable
    axes = KVCache.logical_axes()
    assert axes.k == AXES and len(AXES) == c.k.ndim and axes.length == ("cache_batch",)
    assert jax.tree.structure(c) == jax.tree.structure(jax.tree.map(jnp.asarray, c))


def test_update_writes_rows_at_their_own_start():
    c = KVCache.zeros(2, 2, 6, 1, 1, jnp.float32)
    new = _marked(1, 2, 2, 1.0)[0]  # [B=2, T=2, 1, 1]: row 0 -> 1, 2; row 1 -> 11, 12
    c = jax.jit(lambda c, i: c.update(i, new, -new, jnp.asarray([0, 3])))(c, 1)  # traced layer
    np.testing.assert_array_equal(c.k[1, :, :, 0, 0], [[1, 2, 0, 0, 0, 0], [0, 0, 0, 11, 12, 0]])
    np.testing.assert_array_equal(c.v[1, :, :, 0, 0], -np.asarray(c.k[1, :, :, 0, 0]))
    np.testing.assert_array_equal(c.k[0], 0)  # other layer untouched
    np.testing.assert_array_equal(c.length, [2, 5])
    # a later write before the end keeps the longer length
    c = c.update(0, new[:, :1], new[:, :1], jnp.asarray([1, 1]))
    np.testing.assert_array_equal(c.k[0, :, :3, 0, 0], [[0, 1, 0], [0, 11, 0]])
    np.testing.assert_array_equal(c.length, [2, 5])
    k1, v1 = c.layer(1)
    np.testing.assert_array_equal(k1, c.k[1])
    np.testing.assert_array_equal(c.valid(), np.arange(6)[None] < np.asarray([[2], [5]]))


def test_append_keeps_the_last_max_length_entries():
    """Sliding window (the DiT's 900 frames, spec/detokenizer.md §4.2) on marked frames."""
    max_kv, lp = 8, 5
    k = np.zeros((1, 1, max_kv, 1, 1), np.float32)
    k[0, 0, :6, 0, 0] = np.arange(6)  # 6 valid frames 0..5
    new = np.zeros((1, 1, lp, 1, 1), np.float32)
    new[0, 0, :, 0, 0] = 100 + np.arange(lp)  # 4 valid (100..103), one padded frame (104)
    c = KVCache(k=jnp.asarray(k), v=jnp.asarray(-k), length=jnp.asarray([6]))
    out = c.append(jnp.asarray(new), jnp.asarray(-new), jnp.int32(4), max_length=max_kv)
    np.testing.assert_array_equal(out.length, [8])
    np.testing.assert_array_equal(out.k[0, 0, :, 0, 0], [2, 3, 4, 5, 100, 101, 102, 103])
    np.testing.assert_array_equal(out.v, -out.k)
    c = c.replace(length=jnp.asarray([2]))
    out = c.append(jnp.asarray(new), jnp.asarray(new), jnp.int32(3), max_length=max_kv)
    np.testing.assert_array_equal(out.length, [5])
    np.testing.assert_array_equal(out.k[0, 0, :5, 0, 0], [0, 1, 100, 101, 102])


def test_append_grows_the_buffer():
    """Into a bigger capacity: from an empty (0-slot) cache, and growing with a trim."""
    new = np.zeros((1, 1, 5, 1, 1), np.float32)
    new[0, 0, :, 0, 0] = 100 + np.arange(5)
    empty = KVCache.zeros(1, 1, 0, 1, 1, jnp.float32)
    out = empty.append(new, new, jnp.int32(4), max_length=8, capacity=8)
    assert out.k.shape == out.v.shape == (1, 1, 8, 1, 1)
    np.testing.assert_array_equal(out.length, [4])
    np.testing.assert_array_equal(out.v[0, 0, :4, 0, 0], [100, 101, 102, 103])
    c4 = jnp.asarray(np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1, 1))
    c = KVCache(k=c4, v=c4, length=jnp.asarray([4]))
    out = c.append(new, new, jnp.int32(5), max_length=8, capacity=8)  # 9 frames: oldest dropped
    assert out.k.shape == (1, 1, 8, 1, 1)
    np.testing.assert_array_equal(out.length, [8])
    np.testing.assert_array_equal(out.k[0, 0, :, 0, 0], [1, 2, 3, 100, 101, 102, 103, 104])
    out = c.replace(length=jnp.asarray([3])).append(new, new, 2, max_length=8, capacity=6)
    assert out.k.shape == (1, 1, 6, 1, 1)
    np.testing.assert_array_equal(out.length, [5])
    np.testing.assert_array_equal(out.k[0, 0, :5, 0, 0], [0, 1, 2, 100, 101])
    grown = c.resized(7)
    assert grown.k.shape == (1, 1, 7, 1, 1)
    np.testing.assert_array_equal(grown.k[0, 0, :, 0, 0], [0, 1, 2, 3, 0, 0, 0])


def test_append_rows_independently_and_every_layer():
    c = KVCache(k=_marked(2, 2, 3, 0.0), v=_marked(2, 2, 3, 0.0), length=jnp.asarray([1, 3]))
    new = _marked(2, 2, 2, 50.0)  # layer l, row b: 50 + 100 l + 10 b + slot
    out = jax.jit(lambda c, k: c.append(k, k, 2, max_length=4, capacity=4))(c, new)
    np.testing.assert_array_equal(out.length, [3, 4])
    np.testing.assert_array_equal(out.k[1, 0, :3, 0, 0], [100, 150, 151])  # 1 kept + 2 new
    np.testing.assert_array_equal(out.k[0, 1, :, 0, 0], [11, 12, 60, 61])  # 5 -> last 4

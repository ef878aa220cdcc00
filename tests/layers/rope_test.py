"""RoPE: frequency tables (both reference recipes), rotate-half and interleaved rotations."""

import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.layers import rope


def test_inverse_frequencies():
    # 1 / theta^(2j/H): H = 4, theta = 100 -> [1, 1/10]
    np.testing.assert_allclose(rope.inv_freq(4, 100.0), [1.0, 0.1], rtol=1e-7)
    for table in ("float32", "float64"):
        f = rope.inv_freq(64, 10000.0, table)
        assert f.dtype == np.float32 and f.shape == (32,)
        np.testing.assert_allclose(f, 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=2e-7)
    # the two recipes round differently somewhere on a realistic table (why both exist)
    assert (rope.inv_freq(128, 10000.0, "float32") != rope.inv_freq(128, 10000.0, "float64")).any()
    with pytest.raises(ValueError, match="table_dtype"):
        rope.inv_freq(4, 100.0, "float16")


def test_rotate_half_rotates_channel_pairs_j_and_j_plus_half():
    # H = 4: pairs (0, 2) at angle p * 1 and (1, 3) at angle p * 0.1 (theta 100)
    p = 3
    cos, sin = rope.cos_sin(jnp.asarray([[p]]), 4, 100.0, jnp.float32)
    x = jnp.asarray([1.0, 0.0, 0.0, 2.0]).reshape(1, 1, 1, 4)
    y = np.asarray(rope.apply(x, cos, sin))[0, 0, 0]
    a0, a1 = p * 1.0, p * 0.1
    want = [np.cos(a0), -2 * np.sin(a1), np.sin(a0), 2 * np.cos(a1)]
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)


def test_interleaved_rotates_adjacent_pairs_with_interpolation():
    # H = 4, freqs [1, 0.1]: pair (0, 1) = 1 + 0i turns by p; pair (2, 3) = 0 + 1i by p * 0.1
    freqs = rope.inv_freq(4, 100.0, "float64")
    x = jnp.asarray([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 4)
    for interp in (1.0, 2.0):
        y = np.asarray(rope.apply_interleaved(x, jnp.asarray([[5]]), freqs, interp))[0, 0, 0]
        a0, a1 = 5 / interp, 5 * 0.1 / interp
        np.testing.assert_allclose(
            y, [np.cos(a0), np.sin(a0), -np.sin(a1), np.cos(a1)], rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_the_position_difference(interleaved):
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))

    def rot(x, p):
        pos = jnp.asarray([[p]])
        if interleaved:
            return rope.apply_interleaved(x, pos, rope.inv_freq(8, 10000.0, "float64"))
        return rope.apply(x, *rope.cos_sin(pos, 8, 10000.0, jnp.float32))

    s1 = float(jnp.sum(rot(q, 7) * rot(k, 3)))
    s2 = float(jnp.sum(rot(q, 104) * rot(k, 100)))
    assert abs(s1 - s2) <= 1e-5 * abs(s1)
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 9)), jnp.linalg.norm(q), rtol=1e-6)

"""RMSNorm and LayerNorm against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.layers.norm import LayerNorm, RMSNorm


def _apply(module, params, x):
    return module.apply({"params": params} if params else {}, jnp.asarray(x, jnp.float32))


def test_rms_norm():
    # mean(x^2) = (9 + 16) / 2 = 12.5; x / sqrt(12.5) = [0.84853, 1.13137]; times weight [2, -1]
    y = _apply(RMSNorm(0.0), {"weight": jnp.asarray([2.0, -1.0])}, [[3.0, 4.0]])
    np.testing.assert_allclose(y, [[2 * 3 / np.sqrt(12.5), -4 / np.sqrt(12.5)]], rtol=1e-6)


def test_rms_norm_rounds_before_the_weight_in_bf16():
    """Quirk 8: the normalised value is cast to the input dtype before the weight multiply."""
    x = jnp.asarray([[1.0, 3.0]], jnp.bfloat16)  # mean sq 5: 1 / sqrt 5 = 0.44721 -> bf16 0.4473
    w = jnp.asarray([3.0, 3.0], jnp.bfloat16)
    y = RMSNorm(0.0, dtype=jnp.bfloat16).apply({"params": {"weight": w}}, x)
    n = np.float32(jnp.asarray(1 / np.sqrt(5.0), jnp.bfloat16))
    assert float(y[0, 0]) == float(jnp.asarray(3 * n, jnp.bfloat16))


def test_layer_norm_affine():
    # x = [1, 2, 3, 4]: mean 2.5, biased var 1.25 -> (x - 2.5) / sqrt(1.25) = [-1.342, -0.447, ...]
    z = (np.arange(1, 5) - 2.5) / np.sqrt(1.25)
    w, b = jnp.asarray([1.0, 2.0, 3.0, 4.0]), jnp.asarray([0.5, 0.5, 0.5, 0.5])
    y = _apply(LayerNorm(0.0), {"weight": w, "bias": b}, [[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(y[0], z * np.asarray(w) + 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "kw, names",
    [
        (dict(), {"weight", "bias"}),
        (dict(use_scale=False, use_bias=False), set()),
        (dict(use_bias=False, scale_name="scale"), {"scale"}),
    ],
)
def test_layer_norm_optional_affine(kw, names):
    m = LayerNorm(1e-6, **kw)
    x = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    params = m.init(jax.random.key(0), x).get("params", {})
    assert set(params) == names
    y = m.apply({"params": params} if params else {}, x)  # fresh init: scale 1, bias 0
    np.testing.assert_allclose(y[0], (np.arange(1, 5) - 2.5) / np.sqrt(1.25 + 1e-6), rtol=1e-6)


def test_layer_norm_eps_and_dtype():
    # constant rows have zero variance: the result is 0, and eps keeps it finite
    y = LayerNorm(1e-6, use_scale=False, use_bias=False, dtype=jnp.bfloat16).apply(
        {}, jnp.full((2, 3), 7.0)
    )
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)

"""MLP: gated SiLU (Qwen2) and plain GELU-tanh (timm) with identity weights, by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.layers.mlp import MLP


def _silu(x):
    return x / (1 + np.exp(-x))


def test_gated_silu_with_identity_weights():
    m = MLP(2, gated=True, activation="silu")
    x = jnp.asarray([[[1.0, -2.0]]])
    params = nn.unbox(m.init(jax.random.key(0), x)["params"])
    assert set(params) == {"gate_proj", "up_proj", "down_proj"}
    assert params["gate_proj"]["weight"].shape == (2, 2)  # [out, in], no bias
    eye = jnp.eye(2)
    params = {k: {"weight": eye} for k in params}
    y = np.asarray(m.apply({"params": params}, x))[0, 0]
    # down(silu(x) * x): silu(1) * 1 = 0.731059, silu(-2) * -2 = 0.476812
    np.testing.assert_allclose(y, [_silu(1.0) * 1.0, _silu(-2.0) * -2.0], rtol=1e-6)
    np.testing.assert_allclose(y, [0.731059, 0.476812], rtol=1e-5)
    # [out, in]: a down_proj that swaps the two channels swaps the outputs
    params["down_proj"]["weight"] = jnp.asarray([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(m.apply({"params": params}, x)[0, 0], y[::-1], rtol=1e-6)


def test_plain_gelu_tanh_with_bias():
    m = MLP(3, gated=False, activation="gelu_tanh", act_axes=None)
    x = jnp.asarray([[[1.0, 0.0]]])
    params = nn.unbox(m.init(jax.random.key(0), x)["params"])
    assert set(params) == {"fc1", "fc2"}
    assert params["fc1"]["kernel"].shape == (2, 3) and params["fc1"]["bias"].shape == (3,)
    fc1 = jnp.asarray([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])  # [in, out]: h = [x0, x1, 2 x0] + b
    fc2 = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # y = [h0 + h2, h1] + b2
    params = {"fc1": {"kernel": fc1, "bias": jnp.asarray([0.0, -1.0, 0.0])},
              "fc2": {"kernel": fc2, "bias": jnp.asarray([0.5, 0.0])}}  # fmt: skip

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    y = np.asarray(m.apply({"params": params}, x))[0, 0]
    # gelu_tanh(1) = 0.841192, gelu_tanh(2) = 1.954597, gelu_tanh(-1) = -0.158808
    np.testing.assert_allclose(y, [gelu_tanh(1) + gelu_tanh(2) + 0.5, gelu_tanh(-1)], rtol=1e-6)
    np.testing.assert_allclose(y, [3.295789, -0.158808], rtol=1e-5)

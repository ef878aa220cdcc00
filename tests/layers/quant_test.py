"""layers/quant.py: the weight-only quantizer and the fused int8 matmul.

Checked (fp32, CPU): the round trip error is at most half a quantization step, and the largest
|w| of each group is exact; the fused int8 product (x @ q.T) * s equals x @ dequantized.T to
float32 rounding (bound 1e-6 relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.layers import quant
from kimia_jax.layers.linear import Linear, matmul_t


def _w(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("kind,group", [("int8", None), ("int4", None), ("int4", 32)])
def test_round_trip_error_is_half_a_step(kind, group):
    w = _w((3, 48, 128))
    q = quant.quantize_weight(w, kind, group)
    g = group or (128 if kind == "int8" else 64)
    assert q.q.dtype == {"int8": jnp.int8, "int4": jnp.int4}[kind]
    assert q.scale.shape == (3, 48, 128 // g) and q.per_row == (kind == "int8")
    err = np.abs(np.asarray(q.dequantize(jnp.float32) - w)).reshape(3, 48, -1, g)
    step = np.asarray(q.scale)[..., None]
    assert (err <= step / 2 * (1 + 1e-6)).all()
    # the largest |w| of each group is represented exactly (absmax scaling)
    wmax = np.abs(np.asarray(w)).reshape(3, 48, -1, g).max(-1)
    qmax = {"int8": 127, "int4": 7}[kind]
    np.testing.assert_allclose(np.asarray(q.scale) * qmax, wmax, rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 8, 300])  # both orientations of matmul_t (<= / > 256 rows)
def test_fused_int8_matmul_equals_dequantized_matmul(rows):
    w = quant.quantize_weight(_w((96, 64)), "int8")
    x = _w((rows, 64), 1)
    got = jax.jit(matmul_t)(x, w)
    want = x @ w.dequantize(jnp.float32).T
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert got.dtype == jnp.float32 and err <= 1e-6, err
    # bf16 compute: the product is scaled in float32, then rounded once
    got16 = jax.jit(matmul_t)(x.astype(jnp.bfloat16), w)
    assert got16.dtype == jnp.bfloat16
    assert float(jnp.abs(got16.astype(jnp.float32) - want).max() / jnp.abs(want).max()) < 1e-2
    g4 = quant.quantize_weight(_w((96, 64)), "int4")
    np.testing.assert_allclose(
        matmul_t(x, g4), x @ g4.dequantize(jnp.float32).T, rtol=1e-5, atol=1e-5
    )


def test_linear_takes_a_qweight_and_rows_gathers():
    lin = Linear(24, ("a", "b"), use_bias=True)
    x = _w((2, 5, 16), 2)
    params = jax.tree.map(lambda v: v.unbox() if hasattr(v, "unbox") else v,
                          lin.init(jax.random.key(0), x)["params"],
                          is_leaf=lambda v: hasattr(v, "unbox"))  # fmt: skip
    qw = quant.quantize_weight(params["weight"], "int8")
    got = lin.apply({"params": {**params, "weight": qw}}, x)
    want = x @ qw.dequantize(jnp.float32).T + params["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ids = jnp.asarray([[3, 0], [23, 7]])
    np.testing.assert_allclose(qw.rows(ids, jnp.float32), qw.dequantize(jnp.float32)[ids])


def test_quantize_tree_selects_modules_and_counts_bytes():
    params = {
        "layers_0": {"mlp": {"up_proj": {"weight": _w((8, 4))}},
                     "input_layernorm": {"weight": _w((4,))}},
        "lm_head": {"weight": _w((10, 4))},
    }  # fmt: skip
    q = quant.quantize(params, "int8")  # projections only (the QLoRA default)
    assert isinstance(q["layers_0"]["mlp"]["up_proj"]["weight"], quant.QWeight)
    assert not isinstance(q["lm_head"]["weight"], quant.QWeight)
    assert not isinstance(params["layers_0"]["mlp"]["up_proj"]["weight"], quant.QWeight)
    q2 = quant.quantize(params, "int8", modules=quant.DECODE, consume=True)
    assert q2 is params and isinstance(params["lm_head"]["weight"], quant.QWeight)
    # int8 q (1 B) + one fp32 scale per row; norms stay fp32
    assert quant.summary(q2) == {"quantized": 8 * 4 + 8 * 4 + 10 * 4 + 10 * 4, "float": 16}
    assert quant.nbytes({"a": jnp.zeros((10, 4), jnp.int4)}) == 20
    assert quant.quantize(params, None) is params
    with pytest.raises(ValueError, match="quantize must be one of"):
        quant.quantize(params, "int3")


def test_dense_takes_an_int8_kernel():
    """`quantize_kernel` is the per-row QWeight of the transposed kernel (same integers and
    scales); `dense` multiplies it as (x @ q) * s: equal to x @ dequantized kernel to float32
    rounding (bound 1e-6 relative), bias added; a float kernel gives nn.Dense's result exactly."""
    import flax.linen as nn

    from kimia_jax.layers.linear import dense

    layer = dense(24, ("a", "b"), "d", jnp.float32)
    x = _w((2, 5, 16), 2)
    params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
    params["bias"] = _w((24,), 3)
    k = quant.quantize_kernel(params["kernel"])
    t = quant.quantize_weight(params["kernel"].T, "int8")
    np.testing.assert_array_equal(np.asarray(k.q), np.asarray(t.q).T)
    np.testing.assert_array_equal(np.asarray(k.scale), np.asarray(t.scale)[:, 0])
    got = jax.jit(layer.apply)({"params": {**params, "kernel": k}}, x)
    want = x @ (k.q.astype(jnp.float32) * k.scale) + params["bias"]
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert got.dtype == jnp.float32 and err <= 1e-6, err
    plain = nn.Dense(24).apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(layer.apply({"params": params}, x)), plain)
    tree = {"blocks_0": {"attn": {"qkv": {"kernel": params["kernel"], "bias": params["bias"]}}},
            "input_linear": {"kernel": params["kernel"]}}  # fmt: skip
    q = quant.quantize_dense(tree, "int8")
    assert isinstance(q["blocks_0"]["attn"]["qkv"]["kernel"], quant.QKernel)
    assert not isinstance(q["input_linear"]["kernel"], quant.QKernel)  # not in quant.DIT
    with pytest.raises(ValueError, match="int8' only"):
        quant.quantize_dense(tree, "int4")

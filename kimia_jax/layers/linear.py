"""Linear layer with the weight stored as [out, in] (the PyTorch/HF layout).

Why not flax's Dense ([in, out])? Decode is a matrix-vector product bound by weight bandwidth; on
these CPUs XLA reads `W @ x` with W [out, in] at ~61 GB/s against ~51 GB/s for `x @ W`
(perf-notes.md), and the converter then copies HF tensors without a transpose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimia_jax.layers.quant import QKernel, QWeight

Initializer = Callable[..., jax.Array]

# Up to this many rows, XLA:CPU computes `x @ W.T` much faster as `(W @ x.T).T`. Measured on the
# 2-core Zen 4 hosts (ms, fp32, W [out, in]; batch-8 decode rows): [8, 896] x [4864, 896]
# 17.8 -> 8.4, [8, 4864] x [896, 4864] 11.7 -> 6.9, vocab head [8, 896] x [151936, 896] 97 -> 42;
# never slower up to 256 rows, mixed beyond ~1000 (prefill keeps the plain form). The barrier stops
# XLA from folding the transpose back into the dot, which would undo the choice.
CPU_SMALL_ROWS = 256


def matmul_t(
    x: jax.Array, w: jax.Array | QWeight, preferred_element_type: jnp.dtype | None = None
) -> jax.Array:
    """`x @ w.T` for x [..., in] and w [out, in] -> [..., out], oriented for the backend.

    A per-row quantized `w` (layers/quant.py, int8) is multiplied as (x @ q.T) * scale (the
    integers converted to x's dtype as the dot's operand, the product scaled in float32); grouped
    (int4) weights are dequantized to x's dtype first.
    """
    if isinstance(w, QWeight):
        if not w.per_row:
            return matmul_t(x, w.dequantize(x.dtype), preferred_element_type)
        out = jnp.dtype(preferred_element_type or x.dtype)
        y = matmul_t(x, w.q.astype(x.dtype), jnp.promote_types(out, jnp.float32))
        return (y * w.scale[..., 0]).astype(out)
    rows = math.prod(x.shape[:-1])
    if 0 < rows <= CPU_SMALL_ROWS and jax.default_backend() == "cpu":
        y = jnp.einsum(
            "oi,mi->om",
            w,
            x.reshape(rows, x.shape[-1]),
            preferred_element_type=preferred_element_type,
        )
        return jax.lax.optimization_barrier(y).T.reshape(*x.shape[:-1], w.shape[0])
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=preferred_element_type)


class Linear(nn.Module):
    """y = x @ weight.T (+ bias); weight [out, in] with logical axes (out_axis, in_axis)."""

    features: int
    axes: tuple[str, str]  # logical names of (out, in)
    use_bias: bool = False
    bias_axis: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        fan_in = x.shape[-1]
        w_init = nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0),
            self.axes,
        )
        # A QWeight (layers/quant.py) in place of the weight is used as it is.
        w = self.param("weight", w_init, (self.features, fan_in), self.param_dtype)
        if not isinstance(w, QWeight):
            w = w.astype(self.dtype)
        y = matmul_t(x.astype(self.dtype), w)
        if self.use_bias:
            b_init = nn.with_logical_partitioning(
                nn.initializers.zeros, (self.bias_axis or self.axes[0],)
            )
            b = self.param("bias", b_init, (self.features,), self.param_dtype)
            y = y + b.astype(self.dtype)
        return y


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    name: str,
    dtype: Any,
    *,
    use_bias: bool = True,
    param_dtype: Any = jnp.float32,
) -> nn.Dense:
    """flax `nn.Dense` (kernel [in, out], params `kernel`, `bias`) with logical names `axes`
    (in, out) on the kernel and (out,) on the bias: the layout of checkpoints converted from
    torch models whose weights are transposed once at conversion (DiT, whisper).
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        promote_dtype=_promote_dtype,
        dot_general=_dot_general,
        name=name,
    )


# `dense` takes an int8 `QKernel` too (`quant.quantize_dense`), multiplied by `QKernel.matmul`;
# a float kernel goes through flax's own dtype promotion and `lax.dot_general`, as nn.Dense does
# by default (the same HLO).


def _promote_dtype(*args: Any, dtype: Any = None, inexact: bool = True) -> list[Any]:
    x, kernel, bias = args
    if isinstance(kernel, QKernel):
        dt = dtype or x.dtype
        return [x.astype(dt), kernel, None if bias is None else bias.astype(dt)]
    return nn.dtypes.promote_dtype(*args, dtype=dtype, inexact=inexact)


def _dot_general(x: jax.Array, kernel: Any, dims: Any, precision: Any = None, **kw: Any) -> Any:
    if isinstance(kernel, QKernel):
        return kernel.matmul(x)
    return jax.lax.dot_general(x, kernel, dims, precision=precision, **kw)

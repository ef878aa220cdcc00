"""Linear layer with the weight stored as [out, in] (the PyTorch/HF layout).

Why not flax's Dense ([in, out])? Decode is a matrix-vector product bound by weight bandwidth; on
these CPUs XLA reads `W @ x` with W [out, in] at ~61 GB/s against ~51 GB/s for `x @ W`
(perf-notes.md), and the converter then copies HF tensors without a transpose.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


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
        w = self.param("weight", w_init, (self.features, fan_in), self.param_dtype)
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), w.astype(self.dtype))
        if self.use_bias:
            b_init = nn.with_logical_partitioning(
                nn.initializers.zeros, (self.bias_axis or self.axes[0],)
            )
            b = self.param("bias", b_init, (self.features,), self.param_dtype)
            y = y + b.astype(self.dtype)
        return y

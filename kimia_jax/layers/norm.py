"""RMSNorm (Qwen2RMSNorm twin) and LayerNorm with explicit eps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight; twin of Qwen2RMSNorm.

    Statistics in fp32; the normalised value is cast back to the input dtype *before* the weight
    multiply (spec/llm.md §3.2, quirk 8), so a bf16 run rounds where the reference rounds.
    """

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        w = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(x.dtype).astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) [* scale] [+ bias], biased variance; torch LayerNorm twin.

    Statistics in fp32 (two-pass variance). The affine parts are optional: the LLM's adaptor uses
    both (params `weight`, `bias`), the DiT's adaLN blocks neither (elementwise_affine=False).
    `scale_name` names the scale parameter ("weight" as in torch; "scale" for flax-style trees).
    """

    eps: float
    use_scale: bool = True
    use_bias: bool = True
    scale_name: str = "weight"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            w = self.param(
                self.scale_name,
                nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                (d,),
                self.param_dtype,
            )
            y = y * w.astype(jnp.float32)
        if self.use_bias:
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                (d,),
                self.param_dtype,
            )
            y = y + b.astype(jnp.float32)
        return y.astype(self.dtype)

"""The feed-forward block: gated (Qwen2 SwiGLU) or plain (timm Mlp, GELU-tanh).

    gated:  down_proj(act(gate_proj(x)) * up_proj(x))   Qwen2MLP; weights [out, in] (`Linear`)
    plain:  fc2(act(fc1(x)))                            timm Mlp; kernels [in, out] + bias (`dense`)

Parameter names are those of the converted checkpoints (gate_proj/up_proj/down_proj `weight`;
fc1/fc2 `kernel`, `bias`). The hidden activation is tagged "mlp_hidden" for remat policies.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kimia_jax import sharding
from kimia_jax.layers.linear import Linear, dense

ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


class MLP(nn.Module):
    """Feed-forward block [..., D] -> [..., D]; see the module docstring for the two variants.

    Attributes:
      hidden: width of the inner layer.
      gated: SwiGLU-style gate (three projections, no bias) or plain two-layer MLP (with bias).
      activation: "silu", "gelu_tanh" or "gelu".
      act_axes: logical names of the hidden activation [B, T, hidden] for a sharding constraint
        (None: no constraint).
    """

    hidden: int
    gated: bool = True
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    act_axes: tuple[str, ...] | None = ("batch", "length", "act_mlp")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        d = x.shape[-1]
        if self.gated:
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            g = Linear(self.hidden, ("mlp", "embed"), name="gate_proj", **kw)(x)
            u = Linear(self.hidden, ("mlp", "embed"), name="up_proj", **kw)(x)
            h = act(g) * u
        else:
            kw = dict(param_dtype=self.param_dtype)
            h = act(dense(self.hidden, ("embed", "mlp"), "fc1", self.dtype, **kw)(x))
        if self.act_axes is not None:
            h = sharding.constrain(h, self.act_axes)
        h = checkpoint_name(h, "mlp_hidden")
        if self.gated:
            return Linear(d, ("embed", "mlp"), name="down_proj", dtype=self.dtype,
                          param_dtype=self.param_dtype)(h)  # fmt: skip
        return dense(d, ("mlp", "embed"), "fc2", self.dtype, param_dtype=self.param_dtype)(h)

"""Rematerialization policies by name, shared by every layer stack that remats per layer
(`LlmConfig.remat_policy`, `WhisperConfig.remat_policy`).

"none": no rematerialization; "full": save nothing inside a layer (recompute it in the backward
pass); the others save the named tensors (`checkpoint_name` tags in layers/attention.py and
layers/mlp.py) or every matmul output.
"""

from __future__ import annotations

from typing import Any

import jax

_SAVE = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": _SAVE("query_proj", "key_proj", "value_proj"),
    "save_attn_out": _SAVE("query_proj", "key_proj", "value_proj", "out_proj"),
    "save_mlp_hidden": _SAVE("mlp_hidden"),
}


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint` policy of `name` (None for "none"); ValueError naming the choices."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {name!r}")
    return REMAT_POLICIES[name]

"""Device mesh and the one logical-axis rules table.

Every parameter and cache array carries logical axis names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); this module is the only place that maps them to mesh axes.
Mesh axes: ("data", "fsdp", "tensor").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # --- weights: LLM ---
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # replicated automatically when it does not divide (1 or 4 KV heads)
    ("head_dim", None),
    ("qkv", None),
    ("adaptor_in", None),
    ("norm", None),
    ("layers", None),
    # --- weights: convolutional / audio models ---
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("kernel_w", None),
    ("codebook", None),
    ("mel", None),
    # --- activations ---
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # --- KV cache ---
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; one axis may be -1 ("fill with the remaining
    devices").
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    n = math.prod(sizes)
    if n > len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {n} devices, "
            f"have {len(devices)}"
        )
    grid = np.asarray(devices[:n], dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def parse_mesh(spec: str | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Parses a --mesh flag such as "data=2,fsdp=2,tensor=2" (missing axes: fsdp fills)."""
    sizes = {"data": 1, "fsdp": -1, "tensor": 1}
    if spec:
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in sizes or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"bad --mesh entry {part!r}; expected e.g. data=2,fsdp=2,tensor=2")
            sizes[name] = int(value)
        if "fsdp" not in spec and -1 not in (sizes["data"], sizes["tensor"]):
            sizes["fsdp"] = -1
    return make_mesh(devices=devices, **sizes)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(
    logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
    """PartitionSpec for one array from its logical names; replicates dims that would not divide."""
    if logical is None:
        return PartitionSpec()
    rules = dict(LOGICAL_RULES)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape, strict=True):
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in kimia_jax.sharding.LOGICAL_RULES")
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        flat = tuple(a for a in flat if a not in used and mesh.shape.get(a, 1) > 1)
        if flat and dim % _axis_size(mesh, flat) == 0:
            used.update(flat)
            out.append(flat[0] if len(flat) == 1 else flat)
        else:
            out.append(None)
    return PartitionSpec(*out)


def named_sharding(
    logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh
) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh))


def logical_axes_of(boxed_tree: Any) -> Any:
    """Tree of logical-name tuples (None for unboxed leaves) from a boxed (nn.Partitioned) tree."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else None,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def shardings_for(boxed_abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for a boxed tree from `jax.eval_shape(model.init, ...)` (unboxed
    structure).
    """

    def one(x: Any) -> NamedSharding:
        if isinstance(x, nn.Partitioned):
            return named_sharding(x.names, x.value.shape, mesh)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names inside a jit traced under a mesh; no-op
    otherwise.
    """
    mesh = _current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(logical, x.shape, mesh))


_MESH_STACK: list[Mesh] = []


class use_mesh:  # noqa: N801 - context manager used like a function
    """Context in which `constrain` applies logical constraints to this mesh."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    def __enter__(self) -> Mesh | None:
        if self.mesh is not None:
            _MESH_STACK.append(self.mesh)
        return self.mesh

    def __exit__(self, *exc: object) -> None:
        if self.mesh is not None:
            _MESH_STACK.pop()


def _current_mesh() -> Mesh | None:
    return _MESH_STACK[-1] if _MESH_STACK else None


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{k}={v}" for k, v in mesh.shape.items())


def log_mesh(mesh: Mesh) -> None:
    logging.info(
        "mesh %s over %d devices (%s)", describe(mesh), mesh.size, jax.devices()[0].platform
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

"""Device mesh and the one logical-axis rules table.

Every parameter and cache array carries logical axis names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); this module is the only place that maps them to mesh axes.
Mesh axes: ("data", "fsdp", "tensor").

The mesh of a computation is JAX's own context mesh (`jax.set_mesh`, entered by `mesh_context`):
`constrain` reads it with `jax.sharding.get_abstract_mesh()` while tracing, so the mesh is part of
what a jitted function is traced (and cached) for: the same function called under another mesh, or
under none, is traced again instead of reusing constraints meant for a different mesh.

A dimension that its mesh axes do not divide is replicated; that is logged once per tensor name,
and raises `ShardingError` under `strict` (`set_strict(True)` or the `strict=` argument).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from kimia_jax.errors import ShardingError  # noqa: F401 (re-export)

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


_STRICT = False
_REPORTED: set[str] = set()  # tensor names whose replicated dimension was already logged


def set_strict(strict: bool) -> bool:
    """Makes a non-dividing dimension an error (True) or a logged replication (False, default).

    Returns the previous setting."""
    global _STRICT
    previous, _STRICT = _STRICT, bool(strict)
    return previous


def _axis_size(mesh: Mesh | AbstractMesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    *,
    name: str | None = None,
    strict: bool | None = None,
) -> PartitionSpec:
    """PartitionSpec for one array from its logical names.

    A dimension that its mesh axes do not divide is replicated, logged once per `name` (default:
    the logical names and shape), or raises `ShardingError` when `strict` (default: `set_strict`).
    """
    if logical is None:
        return PartitionSpec()
    rules = dict(LOGICAL_RULES)
    used: set[str] = set()
    out = []
    for axis, dim in zip(logical, shape, strict=True):
        axes = rules.get(axis) if axis is not None else None
        if axis is not None and axis not in rules:
            raise KeyError(f"logical axis {axis!r} has no rule in kimia_jax.sharding.LOGICAL_RULES")
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        flat = tuple(a for a in flat if a not in used and mesh.shape.get(a, 1) > 1)
        if flat and dim % _axis_size(mesh, flat) == 0:
            used.update(flat)
            out.append(flat[0] if len(flat) == 1 else flat)
            continue
        if flat:
            _not_divided(name or f"{tuple(logical)}{tuple(shape)}", axis, dim, flat, mesh, strict)
        out.append(None)
    return PartitionSpec(*out)


def _not_divided(
    name: str, axis: str | None, dim: int, flat: tuple[str, ...], mesh: Any, strict: bool | None
) -> None:
    size = _axis_size(mesh, flat)
    msg = (
        f"{name}: dimension {axis!r} of size {dim} is not divisible by mesh axes {flat} "
        f"(size {size})"
    )
    if _STRICT if strict is None else strict:
        raise ShardingError(msg + "; strict sharding: choose mesh sizes that divide it")
    if name not in _REPORTED:
        _REPORTED.add(name)
        logging.warning(msg + "; it is replicated")


def named_sharding(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    name: str | None = None,
    strict: bool | None = None,
) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh, name=name, strict=strict))


def logical_axes_of(boxed_tree: Any) -> Any:
    """Tree of logical-name tuples (None for unboxed leaves) from a boxed (nn.Partitioned) tree."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else None,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def shardings_for(boxed_abstract: Any, mesh: Mesh, *, strict: bool | None = None) -> Any:
    """NamedShardings for a boxed tree from `jax.eval_shape(model.init, ...)` (unboxed
    structure); tensors are named by their tree path in logs and errors.
    """

    def one(path: Any, x: Any) -> NamedSharding:
        if isinstance(x, nn.Partitioned):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            return named_sharding(x.names, x.value.shape, mesh, name=name, strict=strict)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def current_mesh() -> AbstractMesh | None:
    """The context mesh (`jax.set_mesh` / `mesh_context`) as traced, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, logical: Sequence[str | None], *, name: str | None = None) -> jax.Array:
    """`with_sharding_constraint` by logical names under the context mesh; no-op without one.

    The mesh comes from JAX's context (`mesh_context`), so it is part of the jit cache key.
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(logical, x.shape, mesh, name=name))


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """`jax.set_mesh(mesh)` (the context `constrain` reads); a no-op for None (default device)."""
    if mesh is None:
        yield None
        return
    with jax.set_mesh(mesh):
        yield mesh


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{k}={v}" for k, v in mesh.shape.items())


def log_mesh(mesh: Mesh) -> None:
    logging.info(
        "mesh %s over %d devices (%s)", describe(mesh), mesh.size, jax.devices()[0].platform
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

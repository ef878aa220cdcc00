"""Weight-only quantization: int8 (per output channel) and int4 (per group) [..., out, in] weights.

One quantizer for inference (`KimiAudio(quantize="int8")`: the decode loop reads int8 weights,
half the bytes of bf16) and for QLoRA's frozen base (training/lora.py). A quantized weight is a
`QWeight` pytree (int q, fp32 scales) sitting in the param tree where the float weight was, so
checkpoints' paths, the unrolled/scanned layouts and jit all see the same tree; `Linear` and the
vocabulary matrices of the LLM (embedding lookup, heads) take either.

The int8 matmul keeps the integers in the dot and applies the per-row scale to the product:
x @ (q * s).T = (x @ q.T) * s, so no scaled copy of the matrix is made and the only other op is
the int8 -> compute-dtype convert of the dot's operand. XLA:CPU (jax 0.10) runs that convert as
its own loop into a temporary before the dot (seen in the compiled HLO; a [4864, 896] decode
matmul still took 0.65 ms against 0.94 ms in fp32, median, loaded 2-core EPYC); XLA:GPU can take
such a convert into its GEMM fusion (not measured here: tools/bench_quant.py --platform=gpu).
int4 groups (scales per row and per 64 inputs) are dequantized first.

Why not qwix (0.1.8, tried first, re-checked for this module): `qwix.quantize_model(KimiaLLM,
PtqProvider([QtRule(module_path=".*", weight_qtype="int8")]))` intercepts `jnp.einsum` /
`dot_general` and quantizes the right-hand operand. `layers.linear.matmul_t` puts the weight on the
LEFT for <= 256 rows on CPU (the orientation that decodes ~2x faster there), so on the tiny model
`init` with 4 positions quantized nothing (65 float leaves), and decode steps (1 position) on params
initialized with 300 positions raised `ValueError: Unsupported type: QArray`. Its param tree
(`weight/array/qvalue`, `.../scale`) would also differ from the paths that converters, checkpoints
and the sharding rules use. What is needed is small (this file + 10 lines in `Linear`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

KINDS = ("int8", "int4")
_QMAX = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}

# Param-tree names (the module holding `weight`) of the LLM's matrices.
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN + MLP
HEADS = ("lm_head", "mimo_output")
EMBEDDING = ("embed_tokens",)
# The detokenizer DiT's matrices (`quantize_dense`): every block's fused qkv, attention output,
# MLP and adaLN modulation, and the final layer's modulation (nearly all of its bytes); the
# embeddings, input / output projections and the timestep MLP stay in float.
DIT = ("qkv", "proj", "fc1", "fc2", "adaLN_modulation_1")
# What `KimiAudio(quantize="int8")` quantizes: every matrix a decode step reads (layer projections
# and both vocabulary heads) plus the embedding table (memory only: a step gathers two rows).
# The VQ adaptor (prompt-only) and all norms / biases stay in float.
DECODE = PROJECTIONS + HEADS + EMBEDDING


class _Integers:
    """`shape` / `ndim` of a quantized array are those of its integers `q` (shape checks and
    restores read them like an array's)."""

    q: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim


@flax.struct.dataclass
class QWeight(_Integers):
    """Symmetric absmax-quantized [..., out, in] weight: w ~= q * scale, scales per output row and
    per group of `in // groups` inputs (int8: one group = the whole row; int4: groups of 64)."""

    q: jax.Array  # int8 or int4 [..., out, in]
    scale: jax.Array  # fp32 [..., out, groups]

    @property
    def per_row(self) -> bool:
        return self.scale.shape[-1] == 1

    def dequantize(self, dtype: Any) -> jax.Array:
        *lead, out, n_in = self.q.shape
        groups = self.scale.shape[-1]
        q = self.q.astype(dtype).reshape(*lead, out, groups, n_in // groups)
        return (q * self.scale[..., None].astype(dtype)).reshape(*lead, out, n_in)

    def rows(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Dequantized rows `ids` ([...] int) -> [..., in]: an embedding lookup."""
        q = jnp.take(self.q, ids, axis=0).astype(dtype)
        s = jnp.take(self.scale, ids, axis=0).astype(dtype)
        groups = s.shape[-1]
        q = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups)
        return (q * s[..., None]).reshape(*ids.shape, self.q.shape[-1])


def group_size(n_in: int, kind: str, group: int | None = None) -> int:
    """Inputs per scale: `group`, or the default (int8: the whole row; int4: gcd(in, 64))."""
    group = group or (n_in if kind == "int8" else math.gcd(n_in, 64))
    if n_in % group:
        raise ValueError(f"group {group} does not divide the input width {n_in}")
    return group


def quantize_weight(w: jax.Array, kind: str, group: int | None = None) -> QWeight:
    """Absmax quantization of one [..., out, in] weight ("int8": per row; "int4": per 64 inputs)."""
    if kind not in _QMAX:
        raise ValueError(f"quantization must be one of {KINDS}, got {kind!r}")
    dtype, qmax = _QMAX[kind]
    n_in = w.shape[-1]
    group = group_size(n_in, kind, group)
    g = w.astype(jnp.float32).reshape(*w.shape[:-1], n_in // group, group)
    scale = jnp.max(jnp.abs(g), axis=-1) / qmax
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(g / scale[..., None]), -qmax, qmax).astype(dtype)
    return QWeight(q=q.reshape(w.shape), scale=scale)


_quantize_jit = jax.jit(quantize_weight, static_argnums=(1, 2))


def quantize_leaf(
    path: str, leaf: Any, kind: str, group: int | None = None, *, modules: Sequence[str]
) -> Any:
    """`leaf` (at param path `path`) quantized if `quantize(..., modules=modules)` would
    quantize it, else as it is: one weight at a time, for loaders that never hold the float
    model (`conversion.common.convert(finish=...)`)."""
    return _quantize_jit(leaf, kind, group) if is_target(path, leaf, modules) else leaf


def is_target(path: str, leaf: Any, modules: Sequence[str]) -> bool:
    """`path` ("a/b/<module>/weight") names a >= 2-d weight of one of `modules`."""
    parts = path.split("/")
    return (
        len(parts) >= 2
        and parts[-1] == "weight"
        and parts[-2] in modules
        and not isinstance(leaf, QWeight)
        and getattr(leaf, "ndim", 0) >= 2
    )


def quantize(
    params: Any,
    kind: str | None,
    group: int | None = None,
    *,
    modules: Sequence[str] = PROJECTIONS,
    consume: bool = False,
) -> Any:
    """Every `<module>/weight` matrix with module in `modules` quantized ("int8"/"int4"); every
    other leaf kept as it is. kind None or "none": params unchanged.

    consume: replace the leaves inside `params` itself (nested dicts mutated), so each float
    weight can be freed as soon as its quantized copy exists: on-load quantization then needs the
    float model plus one weight of memory, not the float model plus the quantized one.
    """
    if kind in (None, "none"):
        return params
    if kind not in KINDS:
        raise ValueError(f"quantize must be one of {KINDS} or None, got {kind!r}")
    if not consume:
        params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, QWeight))

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k in list(node):
            v, path = node[k], f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, path + "/")
            elif is_target(path, v, modules):
                node[k] = None  # drop the reference before the copy exists elsewhere
                node[k] = _quantize_jit(v, kind, group)
                del v

    walk(params, "")
    return params


def _scale_sharding(sharding: Any, ndim: int) -> Any:
    """Where a weight's scales [..., out, groups] live: the weight's sharding with the input
    axis unsplit (single-device and other spec-less shardings: the weight's own)."""
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        return sharding
    spec = (*spec, *(None,) * (ndim - len(spec)))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec[:-1], None))


def _map_targets(tree: dict[str, Any], modules: Sequence[str], fn: Any, prefix: str = "") -> Any:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out[k] = _map_targets(v, modules, fn, path + "/")
        else:
            out[k] = fn(v) if is_target(path, v, modules) else v
    return out


def abstract(
    tree: Any, kind: str, group: int | None = None, *, modules: Sequence[str] = PROJECTIONS
) -> Any:
    """The ShapeDtypeStruct tree of `quantize(params, kind, group, modules=modules)` for the
    float model's abstract tree `tree` (ShapeDtypeStructs, shardings kept): what a quantized
    checkpoint restores into, so its float weights never exist. q takes the weight's sharding,
    the scales the same with the input axis unsplit."""
    if kind not in KINDS:
        raise ValueError(f"quantization must be one of {KINDS}, got {kind!r}")
    dtype = _QMAX[kind][0]

    def one(w: jax.ShapeDtypeStruct) -> QWeight:
        *lead, out, n_in = w.shape
        groups = n_in // group_size(n_in, kind, group)
        sh = getattr(w, "sharding", None)
        return QWeight(
            q=jax.ShapeDtypeStruct(w.shape, dtype, sharding=sh),
            scale=jax.ShapeDtypeStruct(
                (*lead, out, groups),
                jnp.float32,
                sharding=None if sh is None else _scale_sharding(sh, len(w.shape)),
            ),
        )

    return _map_targets(tree, modules, one)


def shardings_like(shardings: Any, params: Any) -> Any:
    """The float model's sharding tree fitted to `params`, which may hold QWeights (each gets
    its q and scale shardings as in `abstract`)."""
    if isinstance(params, QWeight):
        return QWeight(q=shardings, scale=_scale_sharding(shardings, params.ndim))
    if isinstance(params, dict):
        return {k: shardings_like(shardings[k], v) for k, v in params.items()}
    return shardings


def kind_of(params: Any) -> str | None:
    """The kind ("int8" / "int4") of the QWeights `params` holds, or None if it holds none."""
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QWeight)):
        if isinstance(leaf, QWeight):
            return "int4" if jnp.dtype(leaf.q.dtype) == jnp.int4 else "int8"
    return None


@flax.struct.dataclass
class QKernel(_Integers):
    """An int8 flax `Dense` kernel [in, out] (the layout of converted DiT / whisper weights) with
    one fp32 scale per output column: kernel ~= q * scale; the same integers and scales as the
    per-row QWeight of its transpose. `layers.linear.dense` multiplies it (`matmul`)."""

    q: jax.Array  # int8 [in, out]
    scale: jax.Array  # fp32 [out]

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., in] @ kernel -> [..., out] in x's dtype: (x @ q) * scale, the integers
        converted as the dot's operand, the product scaled in float32."""
        acc = jnp.promote_types(x.dtype, jnp.float32)
        y = jnp.einsum("...i,io->...o", x, self.q.astype(x.dtype), preferred_element_type=acc)
        return (y * self.scale).astype(x.dtype)


def quantize_kernel(kernel: jax.Array) -> QKernel:
    """Per-output-column absmax int8 of a [in, out] kernel (`quantize_weight` of its transpose)."""
    w = quantize_weight(kernel.T, "int8")
    return QKernel(q=w.q.T, scale=w.scale[:, 0])


_quantize_kernel_jit = jax.jit(quantize_kernel)


def quantize_dense(params: Any, kind: str | None, *, modules: Sequence[str] = DIT) -> Any:
    """`quantize` for flax `Dense` layers (`layers.linear.dense`, kernels [in, out]): every 2-d
    `<module>/kernel` with module in `modules` becomes a `QKernel` (int8 per output channel;
    "int8" is the only kind: the DiT's weights are read once per ODE step of a whole chunk, so
    its matmuls are not bandwidth-bound like decode's and int4 would buy memory only)."""
    if kind in (None, "none"):
        return params
    if kind != "int8":
        raise ValueError(f"Dense layers quantize to 'int8' only, got {kind!r}")

    def walk(node: dict[str, Any], name: str) -> dict[str, Any]:
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out[k] = walk(v, k)
            elif k == "kernel" and name in modules and getattr(v, "ndim", 0) == 2:
                out[k] = _quantize_kernel_jit(v)
            else:
                out[k] = v
        return out

    return walk(params, "")


def nbytes(tree: Any) -> int:
    """Bytes of every array in `tree` as stored densely (int4: half a byte per element)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "dtype"):
            dt = jnp.dtype(leaf.dtype)
            bits = 4 if dt == jnp.int4 else 8 * dt.itemsize
            total += math.ceil(leaf.size * bits / 8)
    return total


def summary(tree: Any) -> dict[str, int]:
    """{"quantized": bytes of QWeights, "float": bytes of the rest} of a param tree."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    q = sum(nbytes(v) for v in flat.values() if isinstance(v, (QWeight, QKernel)))
    return {"quantized": q, "float": sum(nbytes(v) for v in flat.values()) - q}

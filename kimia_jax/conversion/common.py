"""Shared machinery for checkpoint conversion: tensor sources, the rule table, verified placement.

A converter is a table of `Rule(source-name regex, target path template, transform)`. `convert`
walks the source tensor by tensor (never holding more than one source tensor on the host), maps
every name through the table, checks that each source tensor is used exactly once (or explicitly
ignored), that each target is filled exactly once and that every shape matches, and places each
tensor straight onto its shards with `jax.make_array_from_callback`.

Model-family converters (`conversion/llm.py`, ...) only supply the rules and the expected targets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Sharding

from kimia_jax.configs import layout
from kimia_jax.errors import CheckpointError  # noqa: F401 (re-export)

Transform = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Transforms (torch layout -> flax layout)


def same(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
    return w.T


def conv1d(w: np.ndarray) -> np.ndarray:
    """torch Conv1d weight [out, in, k] -> flax Conv kernel [k, in, out]."""
    return np.transpose(w, (2, 1, 0))


def conv_transpose1d(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose1d weight [in, out, k] -> kernel [k, in, out] (no flip; see caller)."""
    return np.transpose(w, (2, 0, 1))


# ----------------------------------------------------------------------------------------------
# Sources


class TensorSource(Protocol):
    """Read-only, lazily loaded named tensors (a safetensors folder, a torch state dict, ...)."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """Tensors of a HF folder: single `model.safetensors`, an index + shards, or one file.

    bf16 tensors come back as `ml_dtypes.bfloat16` numpy arrays (no torch round trip). Shard file
    names are taken from `model.safetensors.index.json` (the released names are irregular).
    """

    def __init__(self, path: str | os.PathLike[str], index_name: str = layout.SAFETENSORS_INDEX):
        from safetensors import safe_open

        path = Path(path)
        self.path = path
        files: dict[str, Path] = {}
        if path.is_file():
            shard_files = [path]
        elif (path / index_name).is_file():
            index = json.loads((path / index_name).read_text())
            if "weight_map" not in index:
                raise CheckpointError(f"{path / index_name}: no 'weight_map' entry")
            shard_files = sorted({path / f for f in index["weight_map"].values()})
            missing = [str(f) for f in shard_files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{path}: shard files named in {index_name} are missing: {missing}"
                )
        else:
            shard_files = sorted(path.glob("*.safetensors"))
            if not shard_files:
                raise CheckpointError(f"{path}: no *.safetensors files and no {index_name}")
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in shard_files:
            try:
                with safe_open(str(f), framework="np") as h:
                    for k in h.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        if k in files:
                            raise CheckpointError(
                                f"tensor {k!r} appears in both {files[k]} and {f}"
                            )
                        files[k] = f
                        self._shapes[k] = tuple(h.get_slice(k).get_shape())
            except CheckpointError:
                raise
            except Exception as e:  # corrupt header, truncated file
                raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from e
        self._files = files

    def names(self) -> list[str]:
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        # One short-lived handle per tensor: safetensors memory-maps the file, and a handle kept
        # open would leave every tensor read so far resident (a whole 19.5 GB release as RSS).
        from safetensors import safe_open

        try:
            with safe_open(str(self._files[name]), framework="np") as h:
                return np.array(h.get_tensor(name), copy=True)
        except Exception as e:
            raise CheckpointError(f"{self._files[name]}: cannot read tensor {name!r} ({e})") from e


class DictSource:
    """In-memory tensors (tests, or a torch state dict already turned into numpy)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = dict(tensors)

    def names(self) -> list[str]:
        return sorted(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self._t[name]))

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._t[name])


# ----------------------------------------------------------------------------------------------
# Rules and conversion


@dataclasses.dataclass(frozen=True)
class Rule:
    """Maps source tensors matching `pattern` (full match) to `target` (a '/'-path template)."""

    pattern: str
    target: str
    transform: Transform = same

    def match(self, name: str) -> str | None:
        m = re.fullmatch(self.pattern, name)
        return m.expand(self.target) if m else None


@dataclasses.dataclass(frozen=True)
class Target:
    """What the model expects at one path: shape, dtype and (optionally) where it lives."""

    shape: tuple[int, ...]
    dtype: Any
    sharding: Sharding | None = None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def plan(
    source: TensorSource,
    rules: Sequence[Rule],
    targets: Mapping[str, Target],
    ignore: Iterable[str] = (),
) -> dict[str, tuple[str, Rule]]:
    """Maps every target path to (source name, rule); raises on any mismatch, naming the tensors."""
    ignore = [re.compile(p) for p in ignore]
    mapping: dict[str, tuple[str, Rule]] = {}
    unused = []
    for name in source.names():
        hits = [(r, t) for r in rules if (t := r.match(name)) is not None]
        if not hits:
            if not any(p.fullmatch(name) for p in ignore):
                unused.append(name)
            continue
        if len(hits) > 1:
            raise CheckpointError(f"tensor {name!r} matches several rules: {[t for _, t in hits]}")
        rule, tgt = hits[0]
        if tgt not in targets:
            unused.append(f"{name} (maps to {tgt!r}, which the model does not have)")
            continue
        if tgt in mapping:
            raise CheckpointError(
                f"target {tgt!r} is filled twice: by {mapping[tgt][0]!r} and by {name!r}"
            )
        mapping[tgt] = (name, rule)
    if unused:
        raise CheckpointError(
            f"{len(unused)} checkpoint tensor(s) are not used by the model: "
            f"{', '.join(unused[:20])}"
        )
    missing = [t for t in targets if t not in mapping]
    if missing:
        raise CheckpointError(
            f"{len(missing)} model parameter(s) have no tensor in the checkpoint: "
            f"{', '.join(missing[:20])}"
        )
    for tgt, (name, rule) in mapping.items():
        got = _transformed_shape(source.shape(name), rule.transform)
        want = tuple(targets[tgt].shape)
        if got != want:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(source.shape(name))} (-> {got} as {tgt!r}); "
                f"the model expects {want}"
            )
    return mapping


def _transformed_shape(shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
    probe = np.lib.stride_tricks.as_strided(
        np.zeros((), np.int8), shape=shape, strides=(0,) * len(shape)
    )
    return tuple(transform(probe).shape)


def convert(
    source: TensorSource,
    rules: Sequence[Rule],
    targets: Mapping[str, Target],
    *,
    ignore: Iterable[str] = (),
    progress: bool = False,
    desc: str = "converting",
    finish: Callable[[str, jax.Array], Any] | None = None,
) -> dict[str, Any]:
    """Loads every target tensor from `source`, verified and placed; returns a flat {path: array}.

    Peak host memory beyond the placed arrays is about one source tensor plus its transformed copy.
    finish: `finish(path, placed array)` is kept instead of the array (e.g. its quantized copy,
    `layers.quant`), so the placed float tensor is freed before the next one is read.
    """
    mapping = plan(source, rules, targets, ignore)
    items = sorted(mapping.items(), key=lambda kv: kv[1][0])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="tensor")
    out: dict[str, jax.Array] = {}
    for tgt, (name, rule) in items:
        t = targets[tgt]
        host = rule.transform(source.get(name))
        if jnp.issubdtype(host.dtype, jnp.floating) and not np.isfinite(host).all():
            raise CheckpointError(f"tensor {name!r} contains NaN or inf values")
        out[tgt] = place(host, t)
        del host
        if finish is not None:
            out[tgt] = finish(tgt, out[tgt])
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name[-40:])
    if bar is not None:
        bar.close()
    logging.info("converted %d tensors from %s; peak RSS %.0f MiB", len(out), desc, peak_rss_mib())
    return out


def place(host: np.ndarray, target: Target) -> jax.Array:
    """Casts to the target dtype and puts the array onto its shards (one slice per device)."""
    dtype = jnp.dtype(target.dtype)
    if target.sharding is None:
        return jax.device_put(np.asarray(host, dtype=dtype))
    return jax.make_array_from_callback(
        tuple(host.shape), target.sharding, lambda idx: np.asarray(host[idx], dtype=dtype)
    )


def targets_from_abstract(
    abstract: Mapping[str, Any], shardings: Mapping[str, Any] | None = None, dtype: Any = None
) -> dict[str, Target]:
    """Flat targets from a (nested) tree of ShapeDtypeStruct and an optional sharding tree."""
    flat = flatten(abstract)
    flat_sh = flatten(shardings) if shardings is not None else {}
    return {
        k: Target(tuple(v.shape), dtype if dtype is not None else v.dtype, flat_sh.get(k))
        for k, v in flat.items()
    }


def targets_for(boxed_abstract: Any, mesh: Any = None, dtype: Any = None) -> dict[str, Target]:
    """Flat targets from a boxed tree (`jax.eval_shape(model.init, ...)`), placed by logical names
    on `mesh` (None: default device), optionally all in one dtype."""
    import flax.linen as nn

    from kimia_jax import sharding

    shardings = sharding.shardings_for(boxed_abstract, mesh) if mesh is not None else None
    return targets_from_abstract(nn.unbox(boxed_abstract), shardings, dtype)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20

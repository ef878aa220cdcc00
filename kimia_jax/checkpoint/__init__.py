"""Orbax checkpoints written atomically, restored straight onto their shards.

A converted model directory looks like (names in `kimia_jax.configs.layout`):
    <dir>/config.json        the released config (verbatim), so the same config code loads both
    <dir>/params/            Orbax StandardCheckpointer tree
    <dir>/kimia_jax.json     what wrote it (format version, source, dtype; an LLM written with
                             --quantize: "quantize", "quantized_modules")
The whole directory is built under a staging name next to the destination and renamed into place
at the end (`kimia_jax.fileio.atomic_dir`), so an interrupted conversion never leaves a
half-written checkpoint behind.

`detect` is the one place that decides whether a model path is one of these or a released folder.
"""

from __future__ import annotations

import enum
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from kimia_jax import fileio
from kimia_jax.configs import layout
from kimia_jax.errors import CheckpointError, CheckpointNotFoundError

FORMAT_VERSION = 1
PARAMS_DIR = layout.ORBAX_PARAMS_DIR
META_FILE = layout.ORBAX_META


class Format(enum.StrEnum):
    ORBAX = "orbax"  # converted by kimia_jax (params/ + kimia_jax.json)
    RELEASED = "released"  # the published files (safetensors / torch .pt + config files)


def is_orbax_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / PARAMS_DIR).is_dir()


def detect(path: str | os.PathLike[str], *, released: Sequence[str], what: str) -> Format:
    """Orbax or released? The one decision every loader makes, with the same errors.

    Args:
      path: the model directory given by the user.
      released: names (files or folders) of which at least one marks the released layout.
      what: the model family, for the error message ("LLM", "detokenizer", ...).
    Raises:
      CheckpointNotFoundError (a CheckpointError and a FileNotFoundError): the path does not
        exist, is not a directory, or holds neither layout.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist (not a checkpoint directory)")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: not a checkpoint directory")
    if is_orbax_dir(path):
        return Format.ORBAX
    if any((path / name).exists() for name in released):
        return Format.RELEASED
    raise CheckpointNotFoundError(
        f"{path}: neither a converted {what} ({META_FILE} + {PARAMS_DIR}/) nor a released "
        f"{what} folder (with {' or '.join(released)})"
    )


def save(
    path: str | os.PathLike[str],
    params: Any,
    *,
    files: Mapping[str, str | bytes] | None = None,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `params` (+ extra small files) to `path` atomically; returns the final path."""
    path = Path(path).absolute()
    with fileio.atomic_dir(path, overwrite=overwrite) as tmp:
        # Bounded host staging: without the limits Orbax copies every array to host buffers at
        # once (measured +3 GiB peak RSS for a 1.5 GiB model); 1 GB batches keep the extra near
        # the largest tensor.
        handler = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=1, save_device_host_concurrent_gb=1
        )
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        for name, content in (files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        # Every file of the tree with its size and CRC-32: `verify` names a missing, truncated or
        # corrupted file instead of TensorStore's errors.
        record = {"format_version": FORMAT_VERSION, **(meta or {}), "files": file_table(tmp)}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, default=str))
    return path


def file_crc32(path: str | os.PathLike[str]) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (the checksum of every manifest we write)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def file_table(root: Path) -> dict[str, list[Any]]:
    """{relative path: [bytes, crc32 hex]} of every file of the Orbax tree `root`/params (the
    config files next to it are checked by their parsers, and may be edited)."""
    table = {}
    for p in sorted((root / PARAMS_DIR).rglob("*")):
        if p.is_file():
            table[p.relative_to(root).as_posix()] = [p.stat().st_size, file_crc32(p)]
    return table


def _quantize_flag(meta: Mapping[str, Any]) -> str:
    return f" --quantize {meta['quantize']}" if meta.get("quantize") else ""


def converter_command(path: str | os.PathLike[str]) -> str:
    """The command that re-creates the converted folder `path` (from what its meta file says)."""
    path = Path(path).absolute()
    for d in (path.parent, path):  # a part of a whole converted model: convert it whole again
        try:
            m = read_meta(d)
        except (OSError, ValueError):
            continue
        if m.get("converted_by") == "tools.convert_kimia":
            glm = f" --glm_tokenizer {m['glm_tokenizer']}" if m.get("glm_tokenizer") else ""
            return (f"python -m tools.convert_kimia --src {m.get('source', '<released folder>')}"
                    f"{glm}{_quantize_flag(m)} --out {d} --overwrite")  # fmt: skip
    try:
        m = read_meta(path)
    except (OSError, ValueError):
        m = {}
    src = m.get("source", "<released folder>")
    model = m.get("model")
    if model == "kimia_llm":
        return (f"python -m tools.convert_llm --hf_dir {src}{_quantize_flag(m)} --out {path} "
                "--overwrite")  # fmt: skip
    if model == "detokenizer":
        return f"python -m tools.convert_detokenizer --src {src} --dst {path} --overwrite"
    if model:
        return f"python -m tools.convert_audio_encoder --src {src} --dst {path} --overwrite"
    return f"python -m tools.convert_kimia --src <released folder> --out {path} --overwrite"


class DamagedCheckpointError(CheckpointError):
    """A converted folder with a missing, truncated or corrupted file."""


def _damaged(path: Path, problem: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"damaged converted checkpoint {path}: {problem}. Re-run the converter to write it "
        f"again: {converter_command(path)}"
    )


def verify(path: str | os.PathLike[str], *, checksums: bool = False) -> None:
    """Checks a converted folder against the file table its meta file records: every file
    present with its size (and, with `checksums`, its CRC-32). Folders written before the table
    existed get the checks Orbax needs (its metadata and manifest files).

    Raises:
      DamagedCheckpointError: names the first missing / truncated / corrupted file and the
        command that re-creates the folder.
    """
    path = Path(path).absolute()
    if not (path / META_FILE).is_file():
        raise _damaged(path, f"{META_FILE} is missing")
    try:
        meta = read_meta(path)
    except ValueError as e:
        raise _damaged(path, f"{META_FILE} is not valid JSON ({e})") from None
    table = meta.get("files")
    if table is None:  # written before file tables: the files Orbax cannot restore without
        table = {f"{PARAMS_DIR}/{n}": None for n in ("_METADATA", "manifest.ocdbt")}
    for rel, want in table.items():
        f = path / rel
        if not f.is_file():
            raise _damaged(path, f"{rel} is missing")
        if want is None:
            continue
        size, crc = want
        got = f.stat().st_size
        if got != size:
            what = "truncated" if got < size else "longer than written"
            raise _damaged(path, f"{rel} is {what} ({got} bytes, written with {size})")
        if checksums and file_crc32(f) != crc:
            raise _damaged(path, f"{rel} is corrupted (its CRC-32 differs from the one written)")


def _key_name(k: Any) -> str:
    # dict keys, sequence indices, and dataclass fields (a `layers.quant.QWeight`'s q / scale,
    # which Orbax stores as a dict)
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def restore(path: str | os.PathLike[str], abstract: Any) -> Any:
    """Restores params into `abstract` (a tree of ShapeDtypeStruct carrying shardings).

    The saved tree is checked against `abstract` first (a config that does not fit the weights,
    a truncated directory): a CheckpointError names the directory and the parameters at fault.
    """
    path = Path(path).absolute()
    params = path / PARAMS_DIR
    if not params.is_dir():
        raise _damaged(path, f"{PARAMS_DIR}/ is missing")
    verify(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params)
            saved = _flat_shapes(getattr(meta.item_metadata, "tree", meta.item_metadata))
            want = _flat_shapes(abstract)
            missing = sorted(set(want) - set(saved))
            unused = sorted(set(saved) - set(want))
            bad = [f"{k} {saved[k]} (the config gives {want[k]})"
                   for k in sorted(set(want) & set(saved)) if saved[k] != want[k]]  # fmt: skip
            if missing or unused or bad:
                raise CheckpointError(
                    f"{params}: the saved parameters do not fit the config: "
                    + "; ".join(
                        f"{what}: {', '.join(items[:10])}"
                        for what, items in (
                            ("missing", missing),
                            ("not in the model", unused),
                            ("shapes", bad),
                        )
                        if items
                    )
                )
            return ckptr.restore(params, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - TensorStore / Orbax errors of every kind
        logging.debug("restore of %s failed", params, exc_info=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        failure = f"cannot restore {params}: {first[:300]}"
    # Outside the handler, so that TensorStore's error does not chain onto ours. Name the
    # damaged file if there is one (the checksums are read only on this path).
    verify(path, checksums=True)
    raise CheckpointError(
        f"{failure}. If the folder was damaged, re-run the converter: {converter_command(path)}"
    )


def restore_model(
    path: str | os.PathLike[str], boxed_abstract: Any, *, mesh: Any = None, dtype: Any = None
) -> Any:
    """Restores a model's params given its boxed abstract tree (`jax.eval_shape(model.init)`):
    each array straight onto its shards by logical axis names (`mesh`; None: the first device),
    optionally cast to one `dtype`."""
    return restore(path, abstract_model(boxed_abstract, mesh=mesh, dtype=dtype))


def abstract_model(boxed_abstract: Any, *, mesh: Any = None, dtype: Any = None) -> Any:
    """What `restore_model` restores into: ShapeDtypeStructs placed by logical axis names on
    `mesh` (None: the first device), optionally all in one `dtype`."""
    import flax.linen as nn

    shapes = nn.unbox(boxed_abstract)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, shapes)
    else:
        from kimia_jax import sharding

        shardings = sharding.shardings_for(boxed_abstract, mesh)
    return abstract_like(shapes, shardings, dtype)


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())


def abstract_like(shapes: Any, shardings: Any, dtype: Any = None) -> Any:
    """ShapeDtypeStruct tree with shardings (and optionally one dtype) for `restore`."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh),
        shapes,
        shardings,
    )

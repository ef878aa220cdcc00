"""Export a trained model (training.md §5.6): the released layout and our Orbax layout.

* `export_released(src, out, params)`: the LLM safetensors and `whisper-large-v3/` written with
  the trained values under the SOURCE folder's tensor names, shapes, dtypes and shard files (the
  official export writes the fine-tuned encoder next to the LLM: shipping a fine-tuned LLM with
  the original Whisper would feed the adaptor features it was not trained on). Names come from
  the source's safetensors through the converters' rule tables (`conversion.llm.rules`,
  `conversion.whisper.RULES`) and each rule's transform is inverted (Linear / Conv1d
  transposes); tensors the model does not use (RoPE buffers, the Whisper decoder) are copied
  unchanged. Everything else of the folder (tokenizer files, glm-4-voice-tokenizer/, detokenizer,
  vocoder) is hard-linked (copied across file systems).
* `export_orbax(src, out, params, ...)`: our converted layout (`conversion.kimia` output, what
  `KimiAudio` loads fastest): LLM + whisper Orbax params, config files, other parts linked.

Both are written atomically (`fileio.atomic_dir`). Process 0 writes; params are gathered first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kimia_jax import checkpoint, fileio
from kimia_jax.configs import layout
from kimia_jax.conversion import common
from kimia_jax.conversion import llm as llm_conv
from kimia_jax.conversion import whisper as whisper_conv
from kimia_jax.errors import CheckpointError


def _invert(transform: Any, w: np.ndarray) -> np.ndarray:
    if transform is common.linear:
        return w.T
    if transform is common.conv1d:
        return np.transpose(w, (2, 1, 0))
    if transform is common.same:
        return w
    raise CheckpointError(f"export: no inverse for the converter transform {transform}")


def _released_tensors(
    src: Path, flat: dict[str, np.ndarray], rules: Any, ignore: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """name -> tensor for every tensor of the released folder `src` (trained values where a rule
    maps it, source values for ignored ones), and name -> shard file."""
    source = common.SafetensorsSource(src)
    out: dict[str, np.ndarray] = {}
    used = set()
    for name in source.names():
        orig = source.get(name)
        path = next((p for r in rules if (p := r.match(name)) is not None), None)
        if path is None:
            if any(re.fullmatch(p, name) for p in ignore):
                out[name] = orig
                continue
            raise CheckpointError(f"export: {src}: no converter rule maps tensor {name!r}")
        rule = next(r for r in rules if r.match(name) is not None)
        if path not in flat:
            raise CheckpointError(f"export: {name!r} -> {path!r}, which the params lack")
        w = _invert(rule.transform, np.asarray(flat[path], np.float32))
        if w.shape != orig.shape:
            raise CheckpointError(f"export: {name}: shape {w.shape} != released {orig.shape}")
        out[name] = w.astype(orig.dtype)
        used.add(path)
    unused = sorted(set(flat) - used)
    if unused:
        raise CheckpointError(f"export: trained params with no released tensor: {unused[:5]}")
    index = src / layout.SAFETENSORS_INDEX
    if index.is_file():
        files = json.loads(index.read_text())["weight_map"]
    else:
        single = sorted(src.glob("*.safetensors"))
        files = {n: single[0].name for n in out}
    return out, files


def _write_safetensors(out: Path, tensors: dict[str, np.ndarray], files: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    by_file: dict[str, dict[str, np.ndarray]] = {}
    for n, f in files.items():
        # safetensors writes an array's raw buffer: a transposed (Fortran-order) view would be
        # written with its elements in the wrong order, silently
        by_file.setdefault(f, {})[n] = np.ascontiguousarray(tensors[n])
    for f, group in by_file.items():
        save_file(group, str(out / f), metadata={"format": "pt"})


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-links (or copies) every file of src into dst except the names in `skip` (top level)."""
    for p in sorted(src.iterdir()):
        if p.name in skip:
            continue
        q = dst / p.name
        if p.is_dir():
            shutil.copytree(p, q, copy_function=_link_or_copy, dirs_exist_ok=True)
        else:
            _link_or_copy(p, q)


def _link_or_copy(a: Any, b: Any) -> None:
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def _weights(folder: Path) -> set[str]:
    """The weight files (rewritten); the index is linked (same names, same shard files)."""
    return {p.name for p in folder.glob("*.safetensors")}


def _host(params: Any) -> dict[str, dict[str, np.ndarray]]:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)
    return {k: common.flatten(jax.tree.map(np.asarray, v)) for k, v in params.items()}


def export_released(src: str | os.PathLike[str], out: str | os.PathLike[str], params: Any) -> Path:
    """Released layout at `out` from the released folder `src` and trained {"llm", "whisper"}."""
    src, out = Path(src), Path(out)
    if checkpoint.is_orbax_dir(src):
        raise CheckpointError(
            f"export_released: {src} is a converted (Orbax) folder; the released layout needs "
            "the released source folder for its tensor names and shard files"
        )
    flat = _host(params)
    if jax.process_index() != 0:
        return out
    wsrc = src / layout.WHISPER_DIR
    wcfg = whisper_conv.load_config(wsrc)
    with fileio.atomic_dir(out, overwrite=True) as tmp:
        t, f = _released_tensors(src, flat["llm"], llm_conv.rules(), list(llm_conv.IGNORE))
        _write_safetensors(tmp, t, f)
        _link_tree(src, tmp, skip=_weights(src) | {layout.WHISPER_DIR})
        (tmp / layout.WHISPER_DIR).mkdir()
        t, f = _released_tensors(
            wsrc, flat["whisper"], whisper_conv.RULES, whisper_conv.ignore_patterns(wcfg)
        )
        _write_safetensors(tmp / layout.WHISPER_DIR, t, f)
        _link_tree(wsrc, tmp / layout.WHISPER_DIR, skip=_weights(wsrc))
    return out


def export_orbax(src: str | os.PathLike[str], out: str | os.PathLike[str], params: Any) -> Path:
    """Our Orbax layout at `out`: LLM + whisper params from `params`, config / tokenizer files
    and the other parts (glm-4-voice-tokenizer, detokenizer) from `src` (either layout)."""
    src, out = Path(src), Path(out)
    flat = _host(params)
    if jax.process_index() != 0:
        return out
    tree = {k: common.unflatten(v) for k, v in flat.items()}
    with fileio.atomic_dir(out, overwrite=True) as tmp:
        llm = tmp / "_llm"
        checkpoint.save(
            llm,
            tree["llm"],
            files={layout.CONFIG_JSON: (src / layout.CONFIG_JSON).read_text()},
            meta={"model": "kimia_llm", "source": str(src.absolute()), "trained": True},
        )
        for p in llm.iterdir():
            os.replace(p, tmp / p.name)
        llm.rmdir()
        wsrc = src / layout.WHISPER_DIR
        files = {
            n: (wsrc / n).read_text()
            for n in (layout.CONFIG_JSON, layout.PREPROCESSOR_CONFIG)
            if (wsrc / n).is_file()
        }
        checkpoint.save(
            tmp / layout.WHISPER_DIR,
            tree["whisper"],
            files=files,
            meta={"model": "whisper_encoder", "source": str(wsrc), "trained": True},
        )
        skip = _weights(src) | {layout.WHISPER_DIR, layout.CONFIG_JSON, layout.SAFETENSORS_INDEX}
        skip |= {p.name for p in (tmp.iterdir())}
        _link_tree(src, tmp, skip=skip)
    return out


def export_all(
    src: str | os.PathLike[str], out: str | os.PathLike[str], params: Any, *_: Any
) -> dict[str, Path]:
    """Both layouts under `out/released` and `out/orbax` (released only from a released src)."""
    out = Path(out)
    res = {"orbax": export_orbax(src, out / "orbax", params), "released": None}
    if not checkpoint.is_orbax_dir(src):
        res["released"] = export_released(src, out / "released", params)
    return res

"""A whole released Kimi-Audio folder -> our converted Orbax layout, atomically.

Output (loadable by `KimiAudio(model_path=out)`; names in `kimia_jax.configs.layout`):
    <out>/                       LLM (Orbax) + config.json + text tokenizer files
    <out>/whisper-large-v3/      whisper encoder (Orbax)
    <out>/glm-4-voice-tokenizer/ GLM-4-Voice VQ tokenizer (Orbax)
    <out>/detokenizer/           DiT + vocoder (Orbax; converting the torch files needs torch)
Everything is built in a staging folder next to `out` and renamed into place at the end
(`kimia_jax.fileio.atomic_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from kimia_jax import fileio
from kimia_jax.configs import DType, layout
from kimia_jax.errors import CheckpointNotFoundError


def prepare_output(
    out: str | os.PathLike[str], *, overwrite: bool, log: Callable[[str], None] = print
) -> list[tuple[Path, int]]:
    """Before a conversion writes `out`: refuses an existing `out` without `overwrite` (before
    any work) and removes the staging folders an interrupted earlier run left next to it,
    reporting each with its size. Returns what was removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    removed = fileio.remove_stale_staging(out)
    for p, size in removed:
        log(f"removed {p} ({fileio.human_bytes(size)}), left by an interrupted conversion")
    return removed


def check_model_folder(
    root: str | os.PathLike[str],
    glm: str | os.PathLike[str],
    *,
    load_detokenizer: bool,
    glm_arg: str | None = None,
) -> None:
    """Checks a model folder (released or converted) before anything is loaded: the parts
    `KimiAudio` will read are there, and converted parts are not damaged (`checkpoint.verify`:
    file table, sizes). Cheap: no weights are read.

    Args:
      root: the model folder.
      glm: the GLM-4-Voice tokenizer folder that will be used.
      load_detokenizer: whether the detokenizer will be loaded.
      glm_arg: how the caller names the tokenizer argument in messages ("glm_tokenizer_path",
        "--glm_tokenizer").
    Raises:
      CheckpointNotFoundError: a part is missing (named, with what to do).
      DamagedCheckpointError: a converted part has a missing / truncated file.
    """
    from kimia_jax import checkpoint

    root, glm = Path(root), Path(glm)
    glm_arg = glm_arg or "glm_tokenizer_path"
    converted = checkpoint.is_orbax_dir(root)
    if not converted and (
        (root / checkpoint.META_FILE).is_file() or (root / checkpoint.PARAMS_DIR).is_dir()
    ):
        checkpoint.verify(root)  # half of a converted folder: names what is missing
    if not glm.is_dir():
        raise CheckpointNotFoundError(
            f"GLM-4-Voice tokenizer not found at {glm}: download THUDM/glm-4-voice-tokenizer "
            f"there or pass {glm_arg}"
        )
    parts = [root, glm, root / layout.WHISPER_DIR]
    if load_detokenizer:
        det = root / layout.DETOKENIZER_DIR
        released = [root / layout.DIT_DIR, root / layout.VOCODER_DIR]
        if det.is_dir():
            parts.append(det)
        elif not all(p.is_dir() for p in released):
            how = (
                f"re-run the conversion with the detokenizer: {checkpoint.converter_command(root)}"
                if converted
                else f"the released folder holds {layout.DIT_DIR}/ and {layout.VOCODER_DIR}/"
            )
            raise CheckpointNotFoundError(
                f"{root} has no detokenizer ({layout.DETOKENIZER_DIR}/, or "
                f"{layout.DIT_DIR}/ + {layout.VOCODER_DIR}/): {how}; or pass "
                f"load_detokenizer=False for text output only"
            )
    for part in parts:
        if (part / checkpoint.META_FILE).is_file() or (part / checkpoint.PARAMS_DIR).is_dir():
            checkpoint.verify(part)


def convert_all(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    glm: str | os.PathLike[str] | None = None,
    dtype: str = "bfloat16",
    detokenizer: bool = True,
    log: Callable[[str], None] = print,
    *,
    overwrite: bool = False,
    quantize: str | None = None,
) -> Path:
    """Converts every part of `src` (LLM, tokenizer files, whisper, GLM tokenizer, detokenizer).

    Args:
      src: the released model folder.
      out: output folder; must not exist.
      glm: the glm-4-voice-tokenizer folder (default `<src>/glm-4-voice-tokenizer`).
      dtype: LLM parameter dtype.
      detokenizer: also convert audio_detokenizer/ + vocoder/ (needs torch).
      log: progress lines.
      overwrite: replace an existing `out` (otherwise an error before any work). Staging folders
        of an interrupted earlier run are removed first and reported through `log`.
      quantize: None, "int8" or "int4": store the LLM's decode matrices quantized
        (`llm.convert_to_orbax(quantize=)`); `KimiAudio(out)` then loads them as they are.
    """
    from kimia_jax.conversion import detokenizer as detok_conv
    from kimia_jax.conversion import llm, whisper

    src, out = Path(src), Path(out)
    glm = Path(glm) if glm is not None else src / layout.GLM_TOKENIZER_DIR
    dtype = DType.parse(dtype).value
    for folder, what in ((src, "src"), (glm, "glm_tokenizer")):
        if not folder.is_dir():
            raise CheckpointNotFoundError(f"{what} {folder} is not a folder")
    prepare_output(out, overwrite=overwrite, log=log)
    with fileio.atomic_dir(out, overwrite=overwrite) as root:
        stats = llm.convert_to_orbax(src, root, dtype=dtype, overwrite=True, quantize=quantize)
        log(f"LLM: {stats['tensors']} tensors, {stats['seconds']:.1f}s"
            + (f", {quantize} decode matrices" if quantize else ""))  # fmt: skip
        for name in layout.TEXT_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, root / name)
        whisper.convert_folder(src / layout.WHISPER_DIR, root / layout.WHISPER_DIR)
        log(f"{layout.WHISPER_DIR}: done")
        whisper.convert_folder(glm, root / layout.GLM_TOKENIZER_DIR)
        log(f"{layout.GLM_TOKENIZER_DIR}: done")
        if detokenizer:
            detok_conv.convert_released(src, root / layout.DETOKENIZER_DIR)
            log("detokenizer + vocoder: done")
        # What converted the whole folder, so that a damaged part names the command to re-run.
        from kimia_jax import checkpoint

        meta = checkpoint.read_meta(root)
        meta.update(converted_by="tools.convert_kimia", source=str(src.absolute()),
                    glm_tokenizer=str(glm.absolute()))  # fmt: skip
        fileio.write_text(root / checkpoint.META_FILE, json.dumps(meta, indent=2, default=str))
    return out

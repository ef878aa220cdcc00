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

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from kimia_jax import fileio
from kimia_jax.configs import DType, layout


def convert_all(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    glm: str | os.PathLike[str] | None = None,
    dtype: str = "bfloat16",
    detokenizer: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Converts every part of `src` (LLM, tokenizer files, whisper, GLM tokenizer, detokenizer).

    Args:
      src: the released model folder.
      out: output folder; must not exist.
      glm: the glm-4-voice-tokenizer folder (default `<src>/glm-4-voice-tokenizer`).
      dtype: LLM parameter dtype.
      detokenizer: also convert audio_detokenizer/ + vocoder/ (needs torch).
      log: progress lines.
    """
    from kimia_jax.conversion import detokenizer as detok_conv
    from kimia_jax.conversion import llm, whisper

    src, out = Path(src), Path(out)
    glm = Path(glm) if glm is not None else src / layout.GLM_TOKENIZER_DIR
    dtype = DType.parse(dtype).value
    with fileio.atomic_dir(out) as root:
        stats = llm.convert_to_orbax(src, root, dtype=dtype, overwrite=True)
        log(f"LLM: {stats['tensors']} tensors, {stats['seconds']:.1f}s")
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
    return out

"""Audio codes for official SFT jsonl lines: the work of `python -m data.extract_codes`, in a
flag-free module that tools and tests can import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kimia_jax.errors import AudioError, ManifestError


def audio_path(content: str, base: Path) -> str:
    p = Path(content)
    return str(p if p.is_absolute() or p.exists() else base / p)


def extract(
    lines: list[dict[str, Any]],
    tokenizer: Any,
    base: Path,
    *,
    offset: int,
    batch_size: int = 16,
    skip_bad: bool = False,
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(lines with audio_tokens, [(line index, error)] of the lines left out)."""
    from kimia_jax.audio import load_audio

    slots: list[tuple[int, dict[str, Any], str]] = []
    for i, rec in enumerate(lines):
        if "conversation" not in rec:
            raise ManifestError(f"line {i + 1}: no 'conversation' (official SFT schema)")
        for m in rec["conversation"]:
            if m.get("message_type") == "audio":
                if not isinstance(m.get("content"), str):
                    raise ManifestError(f"line {i + 1}: an audio message needs a path in 'content'")
                slots.append((i, m, audio_path(m["content"], base)))
    bad: dict[int, str] = {}
    for start in range(0, len(slots), batch_size):
        chunk = slots[start : start + batch_size]
        wavs, keep = [], []
        for i, m, p in chunk:
            if i in bad:
                continue
            try:
                wavs.append(load_audio(p))
                keep.append(m)
            except (AudioError, FileNotFoundError, IsADirectoryError) as e:
                if not skip_bad:
                    raise type(e)(f"line {i + 1}: {e}") from e
                bad[i] = str(e)
        for m, codes in zip(keep, tokenizer.tokenize(wavs) if wavs else [], strict=True):
            m["audio_tokens"] = (np.asarray(codes, np.int64) + offset).tolist()
    out = [rec for i, rec in enumerate(lines) if i not in bad]
    return out, sorted(bad.items())

"""Drop-in for the official `finetune_codes/extract_semantic_codes.py`, batched.

    python -m data.extract_codes --input_file=data.jsonl --output_file=data_codes.jsonl \
        --tokenizer=<glm-4-voice-tokenizer folder or Orbax dir> [--kimia_token_offset=152064]

Reads the official SFT jsonl (`task_type`, `conversation`), runs the GLM-4-Voice tokenizer on every
audio message (our batched JAX tokenizer: `--batch_size` clips per device call, `plan_batches`
bucketing) and writes each line back with `audio_tokens` = codes + `kimia_token_offset` added
exactly once (as `KimiAPromptManager._tokenize_audio` returns them; existing `audio_tokens` are
recomputed, never shifted again). Everything else in a line is kept as it was. Audio paths are
used as written when they exist (the official script's behaviour: relative to the working
folder), else relative to the input file's folder. The output is written atomically. A bad audio
file stops the run naming the line (or, with `--skip_bad`, the line is left out and listed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

from kimia_jax import fileio
from kimia_jax.errors import AudioError, ManifestError

_IN = flags.DEFINE_string("input_file", None, "official SFT jsonl", required=True)
_OUT = flags.DEFINE_string("output_file", None, "jsonl to write (with audio_tokens)", required=True)
_TOK = flags.DEFINE_string(
    "tokenizer", None, "glm-4-voice-tokenizer folder or Orbax dir", required=True
)
_OFFSET = flags.DEFINE_integer("kimia_token_offset", 152064, "id of audio code 0 (config.json)")
_BATCH = flags.DEFINE_integer("batch_size", 16, "clips per tokenizer call")
_SKIP = flags.DEFINE_bool("skip_bad", False, "leave out lines whose audio cannot be read")


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


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.audio import GlmTokenizer

    src = Path(_IN.value)
    if not src.is_file():
        raise app.UsageError(f"--input_file {src} does not exist")
    lines = []
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ManifestError(f"{src}:{n}: invalid JSON ({e})") from e
    tok = GlmTokenizer.from_pretrained(_TOK.value, max_batch=min(_BATCH.value, 8))
    out, bad = extract(
        lines, tok, src.parent, offset=_OFFSET.value, batch_size=_BATCH.value, skip_bad=_SKIP.value
    )
    for i, e in bad:
        logging.warning("line %d left out: %s", i + 1, e)
    fileio.write_text(_OUT.value, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"{len(out)} lines written to {_OUT.value} ({len(bad)} left out)")


if __name__ == "__main__":
    app.run(main)

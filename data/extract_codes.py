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

from absl import app, flags, logging

from data.sft_codes import extract
from kimia_jax import fileio
from kimia_jax.errors import ManifestError

_IN = flags.DEFINE_string("input_file", None, "official SFT jsonl", required=True)
_OUT = flags.DEFINE_string("output_file", None, "jsonl to write (with audio_tokens)", required=True)
_TOK = flags.DEFINE_string(
    "tokenizer", None, "glm-4-voice-tokenizer folder or Orbax dir", required=True
)
_OFFSET = flags.DEFINE_integer("kimia_token_offset", 152064, "id of audio code 0 (config.json)")
_BATCH = flags.DEFINE_integer("batch_size", 16, "clips per tokenizer call")
_SKIP = flags.DEFINE_bool("skip_bad", False, "leave out lines whose audio cannot be read")


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

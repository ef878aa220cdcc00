"""Tokenize a folder of audio files with the GLM-4-Voice tokenizer (optionally whisper features).

    python -m tools.tokenize_audio --input_dir=clips/ --output=tokens.jsonl \
        --tokenizer=glm-4-voice-tokenizer [--whisper=Kimi-Audio-7B-Instruct/whisper-large-v3 \
        --features_dir=feats/]

Writes one JSON line per file, `{"file": <path relative to input_dir>, "num_samples": L,
"tokens": [...]}` (ids before kimia_token_offset), sorted by path; with --whisper also one
`<features_dir>/<relative path>.npy` float32 [N, 4 d_model] per file. Every output is written to a
temporary file and renamed into place. Checkpoints may be HF folders or converted Orbax dirs.
Bad files stop the run with the file named (or are listed and skipped with --skip_bad).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from kimia_jax import fileio

_INPUT = flags.DEFINE_string(
    "input_dir", None, "folder searched recursively for audio files", required=True
)
_OUTPUT = flags.DEFINE_string("output", None, "tokens .jsonl file to write", required=True)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "glm-4-voice-tokenizer folder or Orbax dir", required=True
)
_WHISPER = flags.DEFINE_string("whisper", None, "whisper-large-v3 folder or Orbax dir (optional)")
_FEATURES_DIR = flags.DEFINE_string("features_dir", None, "where to write whisper features (.npy)")
_EXTS = flags.DEFINE_list("extensions", ["wav", "flac", "mp3", "ogg"], "file extensions to read")
_BATCH = flags.DEFINE_integer("batch_size", 8, "clips per device call")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "skip unreadable files instead of stopping")
_DTYPE = flags.DEFINE_enum(
    "whisper_dtype", "float32", ["float32", "bfloat16"], "whisper compute dtype"
)


def _atomic_write(path: Path, write) -> None:
    """Atomic, with the umask's permissions (`kimia_jax.fileio`; mkstemp alone gives 0600)."""
    with fileio.atomic_file(path, "wb") as f:
        write(f)


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.audio import AudioError, GlmTokenizer, WhisperFeatureExtractor, load_audio

    root = Path(_INPUT.value)
    if not root.is_dir():
        raise app.UsageError(f"--input_dir {root} is not a directory")
    if _WHISPER.value and not _FEATURES_DIR.value:
        raise app.UsageError("--whisper needs --features_dir")
    exts = {"." + e.lower().lstrip(".") for e in _EXTS.value}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise app.UsageError(f"no {sorted(exts)} files under {root}")
    tok = GlmTokenizer.from_pretrained(_TOKENIZER.value, max_batch=_BATCH.value)
    wf = None
    if _WHISPER.value:
        wf = WhisperFeatureExtractor.from_pretrained(
            _WHISPER.value, dtype=_DTYPE.value, max_batch=_BATCH.value
        )
    lines, bad = [], []
    bar = tqdm(total=len(files), desc="tokenizing", unit="file")
    for start in range(0, len(files), _BATCH.value):
        chunk, wavs = [], []
        for p in files[start : start + _BATCH.value]:
            try:
                wavs.append(load_audio(p))
                chunk.append(p)
            except (AudioError, FileNotFoundError) as e:
                if not _SKIP_BAD.value:
                    raise
                logging.warning("skipping %s", e)
                bad.append(str(p))
        if wavs:
            tokens = tok.tokenize(wavs)
            feats = wf.features(wavs) if wf is not None else [None] * len(wavs)
            for p, w, t, f in zip(chunk, wavs, tokens, feats, strict=True):
                rel = p.relative_to(root).as_posix()
                lines.append(json.dumps({"file": rel, "num_samples": len(w), "tokens": t.tolist()}))
                if f is not None:
                    out = Path(_FEATURES_DIR.value) / f"{rel}.npy"
                    _atomic_write(out, lambda fh, f=f: np.save(fh, f))
        bar.update(len(files[start : start + _BATCH.value]))
    bar.close()
    _atomic_write(Path(_OUTPUT.value), lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
    logging.info(
        "wrote %d token lines to %s (%d bad files skipped)", len(lines), _OUTPUT.value, len(bad)
    )
    print(
        f"{len(lines)} files tokenized -> {_OUTPUT.value}"
        + (f"; skipped {len(bad)}: {bad}" if bad else "")
    )


if __name__ == "__main__":
    app.run(main)

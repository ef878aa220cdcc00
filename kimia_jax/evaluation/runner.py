"""The inference side of an evaluation run, model-agnostic (experiments/evaluate.py drives it).

Layout under `<workdir>/<model>/<DATASET>/` (the Evalkit's, spec section 4.2, with our per-item
logs instead of its pickles):

    predictions.<i>-of-<n>.jsonl   process i's per-item results, appended as batches finish
                                   (fileio.ResultLog rows: {"id", "text", "error", "status", ...})
    done.<i>-of-<n>                process i finished its shard
    <model>_<DATASET>.jsonl        merged results: manifest records + prediction + real_prompt
                                   (the Evalkit's `utils.dump` jsonl format, re-scorable by it)
    <model>_<DATASET>_<method>_performance.json, <...>_judge.jsonl / _wer_details.jsonl

Items are sharded like run_audio.py (manifest order, process i takes i, i+n, i+2n, ...). Items whose
audio is longer than 60 s or shorter than 0.1 s are not run (status `skipped_duration`) and merge
as `"null"`, as the Evalkit's filter does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kimia_jax.evaluation import benchmarks
from kimia_jax.evaluation.results import parse_jsonl


def shard_rows(rows: Sequence[Any], index: int, count: int) -> list[Any]:
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--process_index {index} must be in [0, --process_count={count})")
    return list(rows[index::count])


def item_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Evalkit's Kimi-Audio message list: the question as a user text message (an empty one
    adds no token, so it is left out), then the audio."""
    audio = row["audio_path"]
    audio = audio[0] if isinstance(audio, list) else audio
    msgs = []
    if row.get("question"):
        msgs.append({"role": "user", "message_type": "text", "content": str(row["question"])})
    msgs.append({"role": "user", "message_type": "audio", "content": audio})
    return msgs


def audio_seconds(path: str | os.PathLike[str]) -> float:
    """Duration of an audio file (header only where soundfile can read it, else librosa)."""
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - formats soundfile cannot open: librosa/audioread decode
        import librosa

        return float(librosa.get_duration(path=str(path)))


def outside_duration(path: str, limits: tuple[float, float] | None = None) -> float | None:
    """The duration when the Evalkit's filter would skip the item, else None."""
    lo, hi = limits or benchmarks.duration_filter()
    d = audio_seconds(path)
    return d if (d > hi or d < lo) else None


def bench_dir(workdir: str | os.PathLike[str], model: str, bench: str) -> Path:
    return Path(workdir) / model / bench


def predictions_path(folder: Path, index: int, count: int) -> Path:
    return folder / f"predictions.{index}-of-{count}.jsonl"


def done_marker(folder: Path, index: int, count: int) -> Path:
    return folder / f"done.{index}-of-{count}"


def merged_name(model: str, bench: str) -> str:
    return f"{model}_{bench}.jsonl"


def collect_predictions(folder: Path) -> dict[str, dict[str, Any]]:
    """Every finished item of every process's log in `folder`, by id (a repeat id: last wins)."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.glob("predictions.*.jsonl")):
        for row in parse_jsonl(p):
            out[str(row["id"])] = row
    return out


def merge(
    manifest: Sequence[Mapping[str, Any]], predictions: Mapping[str, Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Manifest records + `prediction` (str; `"null"` when skipped, failed or missing) +
    `real_prompt` (the question sent; `""` when missing), as run_audio.py's merge."""
    merged, counts = [], {"ok": 0, "skipped_duration": 0, "error": 0, "missing": 0}
    for rec in manifest:
        row = dict(rec)
        p = predictions.get(str(rec["index"]))
        if p is None:
            counts["missing"] += 1
            row["prediction"], row["real_prompt"] = "null", ""
        elif p.get("error") is not None or p.get("text") is None:
            counts["skipped_duration" if p.get("status") == "skipped_duration" else "error"] += 1
            row["prediction"], row["real_prompt"] = "null", ""
        else:
            counts["ok"] += 1
            row["prediction"] = str(p["text"])
            row["real_prompt"] = str(rec.get("question", ""))
        merged.append(row)
    return merged, counts


def write_merged(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """The Evalkit's `utils.misc.dump` for .jsonl: `json.dumps(x, ensure_ascii=False)` lines joined
    by newlines (no trailing newline)."""
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_merged_like_evalkit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The Evalkit's `utils.misc.load` for .jsonl (strip each line, drop one trailing empty line,
    json.loads every line): used to check that our merged files are readable by it."""
    with open(path, encoding="utf-8") as f:
        lines = [x.strip() for x in f.readlines()]
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return [json.loads(x) for x in lines]

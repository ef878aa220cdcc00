"""Batch jobs over a manifest: one request per jsonl line in, one result per jsonl line out.

Manifest (jsonl), one request per line, each with a unique "id" and either
    {"id": "a1", "messages": [<official message dicts>]}
or  {"id": "a2", "audio": "clip.wav", "task": "asr"}            (task: see TASK_PROMPTS)
    {"id": "a3", "audio": "clip.wav", "prompt": "Describe it."}  (prompt overrides the task's)
Relative audio paths are taken relative to the manifest's folder.

Results (jsonl), one line per request:
    {"id": ..., "text": ..., "wav": path or null, "timings": {...}, "error": null or message}

`run` never lets one request abort the batch: rows that cannot be parsed or whose audio is
missing become error lines at once; a generation call that fails is retried request by request
so that only the requests at fault get error lines. It is resumable: ids already in the results
file are skipped, and each finished batch is appended (one `write` per line, then fsync), so a
killed job loses at most the batch in flight and a torn last line is dropped on the next run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kimia_jax.configs import OutputType
from kimia_jax.errors import KimiaError, ManifestError
from kimia_jax.fileio import ResultLog  # the results log (also batch.ResultLog)
from kimia_jax.text.conversation import PromptBuilder

# Instructions: asr = the official infer.py; emotion / sound = the Evalkit's MELD / VocalSound
# frames without the option lists (spec/evaluation.md §1.3); caption = a plain request (the
# Evalkit has no captioning prompt). qa / chat: the spoken audio is the whole prompt.
TASK_PROMPTS = {
    "asr": "请将音频内容转换为文字。",
    "caption": "Please describe the audio in detail.",
    "emotion": "Identify the predominant emotion in this speech.",
    "sound": "Identify the sound in the audio.",
    "qa": None,
    "chat": None,
}


def task_messages(task: str, audio: Any, prompt: str | None = None) -> list[dict[str, Any]]:
    """The official message list for one audio clip and task (README recipes)."""
    if task not in TASK_PROMPTS:
        raise ManifestError(f"unknown task {task!r} (one of {sorted(TASK_PROMPTS)})")
    instruction = prompt if prompt is not None else TASK_PROMPTS[task]
    msgs: list[dict[str, Any]] = []
    if instruction:
        msgs.append({"role": "user", "message_type": "text", "content": instruction})
    msgs.append({"role": "user", "message_type": "audio", "content": audio})
    return msgs


@dataclasses.dataclass(frozen=True)
class Request:
    """One manifest line: `messages` ready for `generate_batch`, or the `error` that line has."""

    id: str
    line: int
    messages: list[dict[str, Any]] | None = None
    error: str | None = None


def _check_messages(messages: Any, base: Path) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, list) or not messages:
        raise ManifestError('"messages" must be a non-empty list of message objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ManifestError(f"messages[{i}] must be an object, got {type(m).__name__}")
        m = dict(m)
        if m.get("message_type") == "audio" and isinstance(m.get("content"), str):
            m["content"] = str(base / m["content"])
            PromptBuilder.check_audio(i, m["content"])
        out.append(m)
    return out


def parse_line(text: str, line: int, base: Path, task: str = "asr") -> Request:
    """One manifest line -> a `Request` (an error request if the line is bad, never raises)."""
    rid = f"line-{line}"
    try:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"a request is a JSON object, got {type(row).__name__}")
        if "id" not in row or not isinstance(row["id"], (str, int)) or row["id"] == "":
            raise ManifestError('every request needs an "id" (a non-empty string or integer)')
        rid = str(row["id"])
        if "messages" in row:
            if "audio" in row:
                raise ManifestError('give either "messages" or "audio" (+ "task"/"prompt")')
            messages = _check_messages(row["messages"], base)
        elif "audio" in row:
            if not isinstance(row["audio"], str) or not row["audio"]:
                raise ManifestError('"audio" must be a file path')
            audio = str(base / row["audio"])
            PromptBuilder.check_audio(0, audio)
            prompt = row.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ManifestError('"prompt" must be a string')
            messages = task_messages(row.get("task", task), audio, prompt)
        else:
            raise ManifestError('a request needs "messages" or "audio"')
        return Request(rid, line, messages=messages)
    except (KimiaError, OSError) as e:
        return Request(rid, line, error=f"manifest line {line}: {e}")


def read_manifest(path: str | os.PathLike[str], task: str = "asr") -> list[Request]:
    """Every non-blank line of the manifest as a `Request`; a repeated id is an error request."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--manifest {path} is a folder, not a jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"--manifest {path} does not exist")
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            req = parse_line(text, n, path.parent, task)
            if req.id in seen:
                req = Request(req.id, n, error=f"manifest line {n}: id {req.id!r} repeats")
            seen.add(req.id)
            out.append(req)
    return out


def wav_name(rid: str) -> str:
    """A file name for a request id (anything but letters, digits, `._-` becomes `_`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", rid)[:120] or "_"


def _row(
    req: Request,
    text: str | None = None,
    wav: str | None = None,
    timings: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    return {"id": req.id, "text": text, "wav": wav, "timings": dict(timings or {}), "error": error}


def _batches(items: Sequence[Request], size: int) -> Iterator[list[Request]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def run(
    model: Any,
    requests: Sequence[Request],
    log: ResultLog,
    *,
    output_type: OutputType | str = OutputType.TEXT,
    wav_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    sampling: Mapping[str, Any] | None = None,
    retry_errors: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Runs every request not yet in `log` through `model.generate_batch`, `batch_size` at a
    time; returns counts {"skipped", "ok", "errors"}.

    A failing batch call is retried one request at a time, so only the requests at fault get
    error lines. `on_batch(done, total)` is called after each batch (progress bars).
    """
    from kimia_jax.detokenizer.wav import write_wav

    output_type = OutputType.parse(output_type)
    if output_type == OutputType.BOTH and wav_dir is None:
        raise ValueError('output_type "both" needs wav_dir (where the replies are written)')
    sampling = dict(sampling or {})
    todo, skipped = [], 0
    for r in requests:
        prev = log.done.get(r.id)
        if prev is not None and (prev.get("error") is None or not retry_errors):
            skipped += 1
        else:
            todo.append(r)
    counts = {"skipped": skipped, "ok": 0, "errors": 0}
    bad = [r for r in todo if r.error is not None]
    if bad:
        log.append(_row(r, error=r.error) for r in bad)
        counts["errors"] += len(bad)
    good = [r for r in todo if r.error is None]
    done = 0
    for group in _batches(good, batch_size):
        try:
            results = model.generate_batch([r.messages for r in group], output_type, seed=seed,
                                           **sampling)  # fmt: skip
            outcome: list[tuple[Any, str | None]] = [(res, None) for res in results]
            timings = {**dataclasses.asdict(model.timings), "batch": len(group)}
        except (KimiaError, OSError) as e:
            if len(group) == 1:
                outcome, timings = [(None, str(e))], {}
            else:  # find the request at fault: one by one
                outcome, timings = [], {"batch": 1}
                for r in group:
                    try:
                        one = model.generate_batch([r.messages], output_type, seed=seed, **sampling)
                        outcome.append((one[0], None))
                    except (KimiaError, OSError) as e1:
                        outcome.append((None, str(e1)))
        rows = []
        for r, (res, err) in zip(group, outcome, strict=True):
            if err is not None:
                rows.append(_row(r, error=err))
                counts["errors"] += 1
                continue
            wav, text = res
            path = None
            if wav is not None and wav_dir is not None:
                path = str(Path(wav_dir) / f"{wav_name(r.id)}.wav")
                write_wav(path, np.asarray(wav))
            rows.append(_row(r, text=text, wav=path, timings=timings))
            counts["ok"] += 1
        log.append(rows)
        done += len(group)
        if on_batch is not None:
            on_batch(done, len(good))
    return counts

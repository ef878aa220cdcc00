"""Input readers: a manifest file or a local corpus folder -> `SourceRow`s (one per input row).

Every row has a stable `row_id` (it names the row in the drop report) and a `doc_id` (the recording
its segments belong to; segments of one recording stay together and in order, training.md §1.1).

Formats (`read_input` picks one from the path, or `kind=` forces it):

* `sft`: the official SFT jsonl (`task_type`, `conversation`; finetune_codes/README.md). One row
  per line; audio paths relative to the file's folder. -> the `sft` record family.
* `audio_jsonl`: one JSON object per line, `{"audio": path, "text"?, "language"?, "doc_id"?,
  "start"?, "end"?, "speaker"?, "id"?}`; rows without text are long recordings to segment (and
  transcribe with a transcription stage). -> `pt_docs` + `audio`.
* `librispeech`: `<root>/**/<spk>-<chapter>.trans.txt` ("<utt-id> TRANSCRIPT" lines) next to
  `<utt-id>.flac`; recording = chapter, language en.
* `aishell`: `<root>/transcript/*.txt` ("<utt-id> 字 字 ..."; spaces between characters removed)
  and `<root>/wav/**/<utt-id>.wav`; recording = speaker folder, language zh.
* `wenetspeech`: `<root>/WenetSpeech.json` (`audios: [{aid, path, segments: [{sid, begin_time,
  end_time, text}]}]`); each segment is a row cut from its long recording; language zh.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from kimia_jax.errors import ManifestError

KINDS = ("sft", "audio_jsonl", "librispeech", "aishell", "wenetspeech")


@dataclasses.dataclass(frozen=True)
class SourceRow:
    """One input row. `start_s`/`end_s` cut a part of `audio` (None: the whole file)."""

    row_id: str
    doc_id: str
    source: str
    family: str  # "pt" (pt_docs + audio records) or "sft" (sft records)
    audio: str = ""
    text: str | None = None
    language: str | None = None
    speaker: str = ""
    start_s: float | None = None
    end_s: float | None = None
    order: int = 0  # position of the row inside its recording
    sft: dict[str, Any] | None = None  # the official record (family "sft")


def detect_kind(path: Path) -> str:
    """The input format of `path` (see the module docstring)."""
    if path.is_file():
        first = ""
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    first = line
                    break
        try:
            obj = json.loads(first) if first else {}
        except json.JSONDecodeError as e:
            raise ManifestError(f"--input {path}: first line is not JSON ({e})") from e
        if "conversation" in obj:
            return "sft"
        if "audio" in obj:
            return "audio_jsonl"
        raise ManifestError(
            f"--input {path}: a jsonl manifest needs 'conversation' (official SFT) or 'audio' keys"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path} does not exist")
    if (path / "WenetSpeech.json").is_file():
        return "wenetspeech"
    if (path / "transcript").is_dir() and (path / "wav").is_dir():
        return "aishell"
    if next(path.rglob("*.trans.txt"), None) is not None:
        return "librispeech"
    raise ManifestError(
        f"--input {path}: not a LibriSpeech (*.trans.txt), AISHELL (transcript/ + wav/) or "
        "WenetSpeech (WenetSpeech.json) folder; pass a jsonl manifest or --input_kind"
    )


def read_input(path: str | Path, kind: str | None = None) -> list[SourceRow]:
    """All rows of the input, in a deterministic order (row ids are unique)."""
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise ValueError(f"--input_kind must be one of {KINDS}, got {kind!r}")
    rows = {
        "sft": _sft,
        "audio_jsonl": _audio_jsonl,
        "librispeech": _librispeech,
        "aishell": _aishell,
        "wenetspeech": _wenetspeech,
    }[kind](path)
    seen: set[str] = set()
    for r in rows:
        if r.row_id in seen:
            raise ManifestError(f"--input {path}: row id {r.row_id!r} appears twice")
        seen.add(r.row_id)
    return rows


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: invalid JSON ({e})") from e
    return out


def _resolve(p: str, base: Path) -> str:
    q = Path(p)
    return str(q if q.is_absolute() else base / q)


def _sft(path: Path) -> list[SourceRow]:
    rows = []
    for lineno, rec in _jsonl(path):
        if "conversation" not in rec or "task_type" not in rec:
            raise ManifestError(f"{path}:{lineno}: official SFT lines need task_type, conversation")
        rid = f"{path.stem}:{lineno}"
        rows.append(
            SourceRow(rid, rid, path.stem, "sft", sft={**rec, "_base_dir": str(path.parent)})
        )
    return rows


def _audio_jsonl(path: Path) -> list[SourceRow]:
    rows = []
    for lineno, rec in _jsonl(path):
        if "audio" not in rec:
            raise ManifestError(f"{path}:{lineno}: an audio manifest line needs an 'audio' path")
        rid = str(rec.get("id", f"{path.stem}:{lineno}"))
        rows.append(
            SourceRow(
                row_id=rid,
                doc_id=str(rec.get("doc_id", rid)),
                source=str(rec.get("source", path.stem)),
                family="pt",
                audio=_resolve(str(rec["audio"]), path.parent),
                text=rec.get("text"),
                language=rec.get("language"),
                speaker=str(rec.get("speaker", "")),
                start_s=rec.get("start"),
                end_s=rec.get("end"),
                order=int(rec.get("order", lineno)),
            )
        )
    return rows


def _librispeech(root: Path) -> list[SourceRow]:
    rows = []
    for trans in sorted(root.rglob("*.trans.txt")):
        doc = trans.name[: -len(".trans.txt")]
        for order, line in enumerate(trans.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            rows.append(
                SourceRow(
                    utt,
                    doc,
                    "librispeech",
                    "pt",
                    str(trans.parent / f"{utt}.flac"),
                    text.strip().lower(),
                    "en",
                    utt.split("-")[0],
                    order=order,
                )
            )
    return rows


def _aishell(root: Path) -> list[SourceRow]:
    texts: dict[str, str] = {}
    for t in sorted((root / "transcript").glob("*.txt")):
        for line in t.read_text(encoding="utf-8").splitlines():
            utt, _, text = line.strip().partition(" ")
            if utt:
                texts[utt] = re.sub(r"\s+", "", text)
    rows = []
    for wav in sorted((root / "wav").rglob("*.wav")):
        utt = wav.stem
        spk = wav.parent.name
        rows.append(
            SourceRow(
                utt,
                spk,
                "aishell",
                "pt",
                str(wav),
                texts.get(utt),
                "zh",
                spk,
                order=len(rows),
            )
        )
    return rows


def _wenetspeech(root: Path) -> list[SourceRow]:
    meta = json.loads((root / "WenetSpeech.json").read_text(encoding="utf-8"))
    rows = []
    for a in meta.get("audios", []):
        aid = str(a["aid"])
        segs = sorted(a.get("segments", []), key=lambda s: (float(s["begin_time"]), s["sid"]))
        for order, s in enumerate(segs):
            rows.append(
                SourceRow(
                    str(s["sid"]),
                    aid,
                    "wenetspeech",
                    "pt",
                    str(root / a["path"]),
                    s.get("text"),
                    "zh",
                    "",
                    float(s["begin_time"]),
                    float(s["end_time"]),
                    order,
                )
            )
    return rows


def guess_language(text: str) -> str:
    """Script-based guess for transcripts without a declared language: "zh" when Han characters
    dominate the letters, "en" when all letters are ASCII, else "other". (No LID model: a row's
    declared `language` always wins; the transcription stage reports its own.)"""
    han = len(re.findall(r"[\u4e00-\u9fff]", text))
    letters = len(re.findall(r"[^\W\d_]", text))
    if letters == 0:
        return "other"
    if han / letters > 0.5:
        return "zh"
    if all(ord(c) < 128 for c in re.findall(r"[^\W\d_]", text)):
        return "en"
    return "other"

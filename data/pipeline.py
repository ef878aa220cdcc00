"""The Beam graph of `python -m data.prepare`, shard bookkeeping and the dataset card.

    rows (manifest / corpus) --shard = hash(doc_id) % n, finished shards left out-->
      pt rows:  Load (decode, down-mix, resample: `kimia_jax.audio.load_audio`)
                -> [recording stages: enhancement, diarization]
                -> Segment (utterance rows kept whole; long recordings: VAD / turns + merge/split)
                -> [segment stages: transcription] -> BatchElements -> Tokenize (GLM codes with our
                batched JAX tokenizer, loaded once per worker in `setup`; tiktoken text ids)
      sft rows: Conversation (every audio message loaded + tokenized in one batched call)
      + every dropped row (reason, detail)
    -> GroupByKey(shard) -> WriteShard: records sorted, ArrayRecord files written atomically
       (staging name, then rename), then the shard's marker `_shards/k-of-n.json` (stats, rows,
       drops) written last: a shard is finished iff its marker exists.

Idempotent / resumable: the shard of a row depends only on its ids and `num_shards` (kept in
`_shards/plan.json` with a fingerprint of the input rows; a different input or shard count in
the same output folder is refused). A re-run leaves out finished shards (nothing is written when
all are finished) and rewrites unfinished ones from scratch; every record depends only on the
input, so an interrupted run + re-run gives the same bytes as one clean run.

Every input row ends in exactly one place: a shard (its `row_id` in a pt_docs/sft record and in
the marker's `rows`) or the marker's `drops` with a reason (`DROP_REASONS`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from absl import logging
from apache_beam.metrics import Metrics

from data import records as rec_lib
from data.manifests import SourceRow, guess_language, read_input
from data.segmentation import Region, SegmentationConfig, segment_recording
from data.stages import ModelStage
from kimia_jax import fileio
from kimia_jax.errors import AudioError, ManifestError

SR = 16000
MARKERS = "_shards"
DROP_REASONS = (
    "missing_file",
    "empty",
    "nan",
    "corrupt",
    "wrong_sample_rate",
    "bad_timestamps",
    "unsupported_language",
    "empty_transcript",
    "too_long",
    "too_short",
    "no_speech",
    "bad_sft_record",
    "error",
)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What `data.prepare` needs besides the Beam options (one flag each)."""

    output: str
    glm_tokenizer: str
    text_tokenizer: str | None = None
    num_shards: int = 0  # 0: ceil(rows / rows_per_shard)
    rows_per_shard: int = 1000
    languages: tuple[str, ...] = ("en", "zh")
    min_sample_rate: int = 16000
    batch_size: int = 8
    segmentation: SegmentationConfig = SegmentationConfig()
    input_kind: str | None = None


def stable_shard(key: str, num_shards: int) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) % num_shards


def shard_of(row: SourceRow, num_shards: int) -> int:
    """Rows of one recording share a shard (document chunks need all of them)."""
    return stable_shard(row.doc_id if row.family == "pt" else row.row_id, num_shards)


def marker_path(out: Path, shard: int, n: int) -> Path:
    return out / MARKERS / f"{shard:05d}-of-{n:05d}.json"


def write_marker(path: Path, stats: dict[str, Any]) -> None:
    """The last write of a shard (tests replace it to simulate a crash just before it)."""
    fileio.write_text(path, json.dumps(stats, sort_keys=True, indent=1))


def _drop(row: SourceRow | dict[str, Any], shard: int, reason: str, detail: str = "") -> dict:
    rid = row.row_id if isinstance(row, SourceRow) else row["row_id"]
    Metrics.counter("drop", reason).inc()
    return {"kind": "drop", "shard": shard, "row_id": rid, "reason": reason, "detail": detail[:300]}


def classify_audio_error(e: BaseException) -> str:
    """The drop reason of a loading error."""
    msg = str(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError)):
        return "missing_file"
    if "empty" in msg or "zero-length" in msg:
        return "empty"
    if "NaN" in msg or "inf sample" in msg:
        return "nan"
    if isinstance(e, AudioError):
        return "corrupt"
    return "error"


def load_clip(path: str, min_rate: int) -> np.ndarray:
    """`kimia_jax.audio.load_audio` after a header check of the sample rate (a file below
    `min_rate` would be upsampled: no content above its Nyquist -> `wrong_sample_rate`)."""
    import soundfile as sf

    from kimia_jax.audio import load_audio

    p = Path(path)
    if p.is_file() and p.stat().st_size > 0:
        try:
            rate = sf.info(str(p)).samplerate
        except Exception:  # not a libsndfile format: load_audio decides (audioread or corrupt)
            rate = None
        if rate is not None and rate < min_rate:
            raise _RateError(f"{p}: sample rate {rate} Hz is below --min_sample_rate={min_rate}")
    return load_audio(path)


class _RateError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# DoFns


class LoadDoFn(beam.DoFn):
    """(shard, pt row) -> a recording {row fields, wav} or a drop."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg

    def process(self, item: tuple[int, SourceRow]) -> Iterable[Any]:
        shard, row = item
        Metrics.counter("load", "rows_in").inc()
        if row.text is not None and not row.text.strip():
            yield beam.pvalue.TaggedOutput("drop", _drop(row, shard, "empty_transcript"))
            return
        lang = row.language or (guess_language(row.text) if row.text else None)
        if row.text is not None and lang not in self.cfg.languages:
            yield beam.pvalue.TaggedOutput(
                "drop", _drop(row, shard, "unsupported_language", f"language {lang!r}")
            )
            return
        try:
            wav = load_clip(row.audio, self.cfg.min_sample_rate)
        except _RateError as e:
            yield beam.pvalue.TaggedOutput("drop", _drop(row, shard, "wrong_sample_rate", str(e)))
            return
        except Exception as e:  # noqa: BLE001 - every bad row is reported, none stops the run
            yield beam.pvalue.TaggedOutput(
                "drop", _drop(row, shard, classify_audio_error(e), str(e))
            )
            return
        offset = 0
        if row.start_s is not None or row.end_s is not None:
            a = int(round((row.start_s or 0.0) * SR))
            b = len(wav) if row.end_s is None else int(round(row.end_s * SR))
            if not 0 <= a < b <= len(wav) + SR // 100:  # 10 ms slack for rounded end times
                yield beam.pvalue.TaggedOutput(
                    "drop",
                    _drop(
                        row,
                        shard,
                        "bad_timestamps",
                        f"[{row.start_s}, {row.end_s}] s outside the {len(wav) / SR:.2f} s file",
                    ),
                )
                return
            wav, offset = wav[a:b], a
        Metrics.counter("load", "audio_ms_in").inc(int(len(wav) * 1000 / SR))
        yield {"shard": shard, "row": row, "wav": wav, "offset": offset, "language": lang}


class SegmentDoFn(beam.DoFn):
    """Recording -> segments. Rows with a transcript are one segment (kept whole: cutting would
    break the transcript; > max_s or < min_segment_s is a drop); rows without are segmented."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg

    def process(self, r: dict[str, Any]) -> Iterable[Any]:
        row: SourceRow = r["row"]
        shard, wav, sc = r["shard"], r["wav"], self.cfg.segmentation
        if row.text is not None:
            d = len(wav) / SR
            if d > sc.max_s:
                yield beam.pvalue.TaggedOutput("drop", _drop(row, shard, "too_long", f"{d:.2f} s"))
                return
            if d < sc.min_segment_s:
                yield beam.pvalue.TaggedOutput("drop", _drop(row, shard, "too_short", f"{d:.2f} s"))
                return
            regions = [Region(0, len(wav))]
            short = 0
        else:
            regions, short = segment_recording(wav, r.get("turns"), sc)
            if not regions:
                yield beam.pvalue.TaggedOutput("drop", _drop(row, shard, "no_speech"))
                return
        for k, reg in enumerate(regions):
            seg = {
                "kind": "seg",
                "shard": shard,
                "row_id": row.row_id,
                "doc_id": row.doc_id,
                "source": row.source,
                "order": row.order,
                "sub": k,
                "start_s": (r["offset"] + reg.start) / SR,
                "end_s": (r["offset"] + reg.end) / SR,
                "speaker": reg.speaker,
                "text": row.text,
                "language": r["language"],
                "asr_model": "manifest" if row.text is not None else "",
                "wav": wav[reg.start : reg.end],
            }
            if r.get("wav_enh") is not None:
                seg["wav_enh"] = r["wav_enh"][reg.start : reg.end]
            Metrics.counter("segment", "segments_out").inc()
            Metrics.counter("segment", "audio_ms_out").inc(int(reg.length * 1000 / SR))
            yield seg
        if short:
            Metrics.counter("segment", "segments_too_short").inc(short)
            yield {"kind": "short", "shard": shard, "row_id": row.row_id, "n": short}


class StageDoFn(beam.DoFn):
    """A model stage over batches (`BatchElements` upstream); the model is loaded once per worker.
    A transcription stage only touches segments without a transcript."""

    def __init__(self, stage: ModelStage) -> None:
        self.stage = stage

    def setup(self) -> None:
        self.stage.setup()

    def process(self, batch: list[dict[str, Any]]) -> Iterable[Any]:
        todo = [x for x in batch if self.stage.level == "recording" or x.get("text") is None]
        if todo:
            self.stage.process(todo)
            Metrics.counter(self.stage.name, "items").inc(len(todo))
        yield from batch


class TokenizeDoFn(beam.DoFn):
    """Segments (a batch) -> + GLM-4-Voice codes (+ of the enhanced version) and text ids."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        from kimia_jax.audio import GlmTokenizer

        self.tok = GlmTokenizer.from_pretrained(
            self.cfg.glm_tokenizer, max_batch=self.cfg.batch_size
        )
        self.text = None
        if self.cfg.text_tokenizer:
            from kimia_jax.text.tokenizer import TextTokenizer

            self.text = TextTokenizer.from_pretrained(self.cfg.text_tokenizer)

    def process(self, batch: list[dict[str, Any]]) -> Iterable[Any]:
        t0 = time.perf_counter()
        codes = self.tok.tokenize([s["wav"] for s in batch])
        enh = [s for s in batch if s.get("wav_enh") is not None]
        codes_enh = self.tok.tokenize([s["wav_enh"] for s in enh]) if enh else []
        for s, c in zip(enh, codes_enh, strict=True):
            s["codes_enh"] = c
        Metrics.distribution("tokenize", "batch_ms").update(int(1000 * (time.perf_counter() - t0)))
        for s, c in zip(batch, codes, strict=True):
            s["codes"] = c
            text, lang = s.get("text"), s.get("language")
            if text and lang in self.cfg.languages:
                if self.text is None:
                    raise ManifestError(
                        "transcripts need --text_tokenizer (a tiktoken.model folder)"
                    )
                s["text_ids"] = np.asarray(self.text.encode(text), np.int32)
            else:
                s["text_ids"] = None
                if text and s.get("asr_model") not in ("", "manifest"):
                    Metrics.counter("tokenize", "asr_text_unsupported_language").inc()
            Metrics.counter("tokenize", "segments").inc()
            yield s


class SftDoFn(beam.DoFn):
    """(shard, sft row) -> a prepared conversation (audio loaded and tokenized) or a drop."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        TokenizeDoFn.setup(self)  # type: ignore[arg-type]

    def process(self, item: tuple[int, SourceRow]) -> Iterable[Any]:
        shard, row = item
        rec = dict(row.sft or {})
        base = Path(rec.pop("_base_dir", "."))
        Metrics.counter("sft", "rows_in").inc()
        msgs, wavs = [], []
        for i, m in enumerate(rec.get("conversation", [])):
            mt = m.get("message_type")
            if mt not in ("text", "audio") or not isinstance(m.get("content"), str):
                yield beam.pvalue.TaggedOutput(
                    "drop", _drop(row, shard, "bad_sft_record", f"message {i}: message_type {mt!r}")
                )
                return
            if mt == "text":
                if self.text is None:
                    raise ManifestError("SFT conversations need --text_tokenizer")
                ids = np.asarray(self.text.encode(m["content"]), np.int32)
                msgs.append(
                    {"role": m.get("role"), "kind": "text", "text": m["content"], "text_ids": ids}
                )
            else:
                p = Path(m["content"])
                try:
                    wav = load_clip(
                        str(p if p.is_absolute() else base / p), self.cfg.min_sample_rate
                    )
                except _RateError as e:
                    yield beam.pvalue.TaggedOutput(
                        "drop", _drop(row, shard, "wrong_sample_rate", str(e))
                    )
                    return
                except Exception as e:  # noqa: BLE001
                    yield beam.pvalue.TaggedOutput(
                        "drop", _drop(row, shard, classify_audio_error(e), str(e))
                    )
                    return
                msgs.append({"role": m.get("role"), "kind": "audio", "audio": wav})
                wavs.append(wav)
        codes = self.tok.tokenize(wavs) if wavs else []
        it = iter(codes)
        for m in msgs:
            if m["kind"] == "audio":
                m["codes"] = next(it).astype(np.int32)
        out_type = "text" if rec.get("task_type") == "understanding" else "both"
        conv = {
            "row_id": row.row_id,
            "task": str(rec.get("task_type", "sft")),
            "output_type": out_type,
            "messages": msgs,
        }
        Metrics.counter("sft", "conversations").inc()
        yield {
            "kind": "sft",
            "shard": shard,
            "row_id": row.row_id,
            "record": rec_lib.sft_record(conv),
        }


class WriteShardDoFn(beam.DoFn):
    """(shard, items) -> the shard's record files, then its marker (stats, rows, drops)."""

    def __init__(self, out: str, num_shards: int) -> None:
        self.out, self.n = out, num_shards

    def process(self, kv: tuple[int, Iterable[dict[str, Any]]]) -> Iterable[dict[str, Any]]:
        shard, items = kv
        out = Path(self.out)
        segs, sfts, drops, short = [], [], [], 0
        for x in items:
            kind = x["kind"]
            if kind == "seg":
                segs.append(x)
            elif kind == "sft":
                sfts.append(x)
            elif kind == "drop":
                drops.append({k: x[k] for k in ("row_id", "reason", "detail")})
            elif kind == "short":
                short += int(x["n"])
        files: dict[str, dict[str, Any]] = {}
        from kimia_jax.training.data import write_records

        if segs:
            docs, audio = rec_lib.pt_records(segs, shard)
            for fam, recs in (("audio", audio), ("pt_docs", docs)):
                name = rec_lib.shard_name(fam, shard, self.n)
                write_records(out / name, recs)
                files[fam] = {"file": name, "records": len(recs)}
        if sfts:
            sfts.sort(key=lambda x: x["row_id"])
            name = rec_lib.shard_name("sft", shard, self.n)
            write_records(out / name, [x["record"] for x in sfts])
            files["sft"] = {"file": name, "records": len(sfts)}
        secs: Counter[str] = Counter()
        nseg: Counter[str] = Counter()
        for s in segs:
            lang = s.get("language") or "unknown"
            secs[lang] += len(s["wav"]) / SR
            nseg[lang] += 1
        rows = sorted({s["row_id"] for s in segs} | {x["row_id"] for x in sfts})
        stats = {
            "shard": shard,
            "num_shards": self.n,
            "files": files,
            "segments": len(segs),
            "conversations": len(sfts),
            "seconds": round(sum(secs.values()), 3),
            "seconds_by_language": {k: round(v, 3) for k, v in sorted(secs.items())},
            "segments_by_language": dict(sorted(nseg.items())),
            "segments_with_text": sum(s.get("text_ids") is not None for s in segs),
            "sources": dict(sorted(Counter(s["source"] for s in segs).items())),
            "segments_dropped_too_short": short,
            "rows": rows,
            "drops": sorted(drops, key=lambda d: d["row_id"]),
        }
        write_marker(marker_path(out, shard, self.n), stats)
        Metrics.counter("write", "shards").inc()
        done = len(glob.glob(str(out / MARKERS / f"*-of-{self.n:05d}.json")))
        logging.info(
            "shard %d/%d written: %d segments, %d conversations, %d drops (%d/%d shards finished)",
            shard,
            self.n,
            len(segs),
            len(sfts),
            len(drops),
            done,
            self.n,
        )
        yield stats


# ----------------------------------------------------------------------------------------------
# driver


def _fingerprint(rows: Sequence[SourceRow]) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(f"{r.row_id}\t{r.doc_id}\t{r.family}\n".encode())
    return h.hexdigest()


def plan_shards(rows: Sequence[SourceRow], cfg: PrepareConfig) -> int:
    """The shard count (checked against / stored in `_shards/plan.json`)."""
    out = Path(cfg.output)
    n = cfg.num_shards or max(1, math.ceil(len(rows) / cfg.rows_per_shard))
    fp = _fingerprint(rows)
    plan_file = out / MARKERS / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        if plan["input_fingerprint"] != fp:
            raise ManifestError(
                f"--output {out} was prepared from a different input (row ids differ); "
                "use a new --output folder"
            )
        if cfg.num_shards and plan["num_shards"] != cfg.num_shards:
            raise ManifestError(
                f"--output {out} has {plan['num_shards']} shards, --num_shards={cfg.num_shards}: "
                "use the same count to resume, or a new --output folder"
            )
        return int(plan["num_shards"])
    fileio.write_text(
        plan_file,
        json.dumps({"num_shards": n, "input_fingerprint": fp, "rows": len(rows)}, indent=1),
    )
    return n


def remove_staging(out: Path) -> list[Path]:
    """Staging files of interrupted writes (`.<name>.tmp-*`) in the output folders."""
    found = [
        Path(p)
        for d in (out, out / MARKERS)
        for p in glob.glob(str(d / f".*{fileio.STAGING_MARK}*"))
    ]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def build(
    p: beam.Pipeline,
    todo: Sequence[tuple[int, SourceRow]],
    cfg: PrepareConfig,
    num_shards: int,
    stages: Sequence[ModelStage] = (),
) -> beam.PCollection:
    """The graph of the module docstring on pipeline `p`; returns the per-shard stats."""
    rows = p | "Rows" >> beam.Create(list(todo)) | "Spread" >> beam.Reshuffle()
    pt = rows | "PtRows" >> beam.Filter(lambda kv: kv[1].family == "pt")
    sft = rows | "SftRows" >> beam.Filter(lambda kv: kv[1].family == "sft")
    loaded = pt | "Load" >> beam.ParDo(LoadDoFn(cfg)).with_outputs("drop", main="rec")
    recs = loaded.rec
    for s in (s for s in stages if s.level == "recording"):
        recs = (
            recs
            | f"Batch-{s.name}"
            >> beam.BatchElements(min_batch_size=1, max_batch_size=cfg.batch_size)
            | f"Stage-{s.name}" >> beam.ParDo(StageDoFn(s))
        )
    segd = recs | "Segment" >> beam.ParDo(SegmentDoFn(cfg)).with_outputs("drop", main="seg")
    segs = segd.seg | "OnlySegs" >> beam.Filter(lambda x: x.get("kind") == "seg")
    shorts = segd.seg | "OnlyShort" >> beam.Filter(lambda x: x.get("kind") == "short")
    for s in (s for s in stages if s.level == "segment"):
        segs = (
            segs
            | f"Batch-{s.name}"
            >> beam.BatchElements(min_batch_size=1, max_batch_size=cfg.batch_size)
            | f"Stage-{s.name}" >> beam.ParDo(StageDoFn(s))
        )
    toks = (
        segs
        | "BatchTok" >> beam.BatchElements(min_batch_size=1, max_batch_size=cfg.batch_size)
        | "Tokenize" >> beam.ParDo(TokenizeDoFn(cfg))
    )
    sftd = sft | "Conversations" >> beam.ParDo(SftDoFn(cfg)).with_outputs("drop", main="conv")
    everything = (
        toks,
        shorts,
        sftd.conv,
        loaded.drop,
        segd.drop,
        sftd.drop,
    ) | "All" >> beam.Flatten()
    return (
        everything
        | "ByShard" >> beam.Map(lambda x: (x["shard"], x))
        | "Group" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(WriteShardDoFn(cfg.output, num_shards))
    )


def card(out: Path, num_shards: int) -> dict[str, Any]:
    """The dataset card (hours, segments, languages, drops by reason) and index of the shards."""
    stats = []
    for k in range(num_shards):
        m = marker_path(out, k, num_shards)
        if m.is_file():
            stats.append(json.loads(m.read_text()))
    secs: Counter[str] = Counter()
    segs: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    index: dict[str, list[dict[str, Any]]] = {}
    for s in stats:
        secs.update(s["seconds_by_language"])
        segs.update(s["segments_by_language"])
        sources.update(s["sources"])
        drops.update(d["reason"] for d in s["drops"])
        for fam, f in sorted(s["files"].items()):
            index.setdefault(fam, []).append(f)
    plan = json.loads((out / MARKERS / "plan.json").read_text())
    c = {
        "num_shards": num_shards,
        "finished_shards": len(stats),
        "rows_in": plan["rows"],
        "rows_written": sum(len(s["rows"]) for s in stats),
        "rows_dropped": sum(len(s["drops"]) for s in stats),
        "drops_by_reason": dict(sorted(drops.items())),
        "hours": round(sum(secs.values()) / 3600, 6),
        "hours_by_language": {k: round(v / 3600, 6) for k, v in sorted(secs.items())},
        "segments": sum(s["segments"] for s in stats),
        "segments_by_language": dict(sorted(segs.items())),
        "segments_with_text": sum(s["segments_with_text"] for s in stats),
        "segments_dropped_too_short": sum(s["segments_dropped_too_short"] for s in stats),
        "conversations": sum(s["conversations"] for s in stats),
        "sources": dict(sorted(sources.items())),
        "files": {fam: sorted(v, key=lambda f: f["file"]) for fam, v in sorted(index.items())},
    }
    return c


def card_markdown(c: dict[str, Any]) -> str:
    lines = [
        "# Dataset card",
        "",
        f"Shards: {c['finished_shards']}/{c['num_shards']} finished. Rows: {c['rows_in']} in, "
        f"{c['rows_written']} written, {c['rows_dropped']} dropped.",
        "",
        f"Audio: {c['hours']:.4f} h in {c['segments']} segments ({c['segments_with_text']} with "
        f"transcript); {c['conversations']} SFT conversations; "
        f"{c['segments_dropped_too_short']} VAD segments shorter than the minimum left out.",
        "",
        "| language | hours | segments |",
        "|---|---|---|",
    ]
    for lang, h in c["hours_by_language"].items():
        lines.append(f"| {lang} | {h:.4f} | {c['segments_by_language'].get(lang, 0)} |")
    lines += ["", "| drop reason | rows |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in c["drops_by_reason"].items()] or ["| (none) | 0 |"]
    lines += ["", "| family | files | records |", "|---|---|---|"]
    for fam, fs in c["files"].items():
        lines.append(f"| {fam} | {len(fs)} | {sum(f['records'] for f in fs)} |")
    lines += [
        "",
        "Sources: " + ", ".join(f"{k} ({v} segments)" for k, v in c["sources"].items()),
        "",
    ]
    return "\n".join(lines)


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    fileio.write_text(path, text)
    return True


def run(
    input_path: str | Sequence[str],
    cfg: PrepareConfig,
    beam_args: Sequence[str] = (),
    stages: Sequence[ModelStage] = (),
) -> dict[str, Any]:
    """Prepares `input_path` (one or several inputs) into `cfg.output`; returns {"card",
    "shards_written", "counters", "card_written"}."""
    from apache_beam.options.pipeline_options import PipelineOptions

    out = Path(cfg.output)
    if not Path(cfg.glm_tokenizer).exists():
        raise FileNotFoundError(f"--glm_tokenizer {cfg.glm_tokenizer} does not exist")
    if cfg.text_tokenizer and not (Path(cfg.text_tokenizer) / "tiktoken.model").is_file():
        raise FileNotFoundError(f"--text_tokenizer {cfg.text_tokenizer}: no tiktoken.model there")
    inputs = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    rows = [r for i in inputs for r in read_input(i, cfg.input_kind)]
    if len({r.row_id for r in rows}) != len(rows):
        raise ManifestError(f"--input {inputs}: row ids repeat across the inputs")
    if not rows:
        raise ManifestError(f"--input {input_path}: no rows")
    if cfg.text_tokenizer is None and any(r.text is not None or r.family == "sft" for r in rows):
        raise ManifestError("the input has transcripts / conversations: pass --text_tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    n = plan_shards(rows, cfg)
    stale = remove_staging(out)
    if stale:
        logging.info("removed %d staging files of an interrupted run", len(stale))
    by_shard: dict[int, list[SourceRow]] = {}
    for r in rows:
        by_shard.setdefault(shard_of(r, n), []).append(r)
    for k in range(n):  # shards that no row maps to are finished by definition
        if k not in by_shard and not marker_path(out, k, n).is_file():
            write_marker(
                marker_path(out, k, n),
                {
                    "shard": k,
                    "num_shards": n,
                    "files": {},
                    "segments": 0,
                    "conversations": 0,
                    "seconds": 0.0,
                    "seconds_by_language": {},
                    "segments_by_language": {},
                    "segments_with_text": 0,
                    "sources": {},
                    "segments_dropped_too_short": 0,
                    "rows": [],
                    "drops": [],
                },
            )
    todo = [
        (k, r)
        for k, rs in sorted(by_shard.items())
        if not marker_path(out, k, n).is_file()
        for r in rs
    ]
    logging.info(
        "%d rows in %d shards; %d shards to write (%d rows), %d already finished",
        len(rows),
        n,
        len({k for k, _ in todo}),
        len(todo),
        n - len({k for k, _ in todo}),
    )
    counters: dict[str, int] = {}
    if todo:
        p = beam.Pipeline(options=PipelineOptions(list(beam_args)))
        build(p, todo, cfg, n, stages)
        result = p.run()
        result.wait_until_finish()
        try:
            for c in result.metrics().query()["counters"]:
                key = f"{c.key.metric.namespace}.{c.key.metric.name}"
                counters[key] = counters.get(key, 0) + int(c.committed or c.attempted or 0)
        except Exception:  # noqa: BLE001 - some runners do not report metrics
            pass
        for k, v in sorted(counters.items()):
            logging.info("counter %s = %d", k, v)
    c = card(out, n)
    written = _write_if_changed(out / "dataset_card.json", json.dumps(c, indent=1, sort_keys=True))
    written |= _write_if_changed(out / "DATASET_CARD.md", card_markdown(c))
    index = {"num_shards": n, "files": c["files"]}
    written |= _write_if_changed(out / "index.json", json.dumps(index, indent=1, sort_keys=True))
    return {
        "card": c,
        "shards_written": len({k for k, _ in todo}),
        "counters": counters,
        "card_written": written,
    }


def shard_files(out: str | os.PathLike[str], family: str) -> list[str]:
    """The files of one record family in a prepared folder (from its index.json)."""
    out = Path(out)
    index = json.loads((out / "index.json").read_text())
    return [str(out / f["file"]) for f in index["files"].get(family, [])]

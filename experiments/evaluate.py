"""Evaluate Kimi-Audio on the report's benchmarks, scored exactly as Kimi-Audio-Evalkit scores them.

    python -m experiments.evaluate --model_path /data/kimia-orbax
        --benchmarks=LibriSpeech,mmau-test-mini,voicebench --data_dir /data/evalkit
        --workdir /data/eval_result

Per benchmark: the Evalkit manifest (`<data_dir>/<NAME>/<NAME>.jsonl`, `<SERIES>/<NAME>.jsonl`,
...; plain `{"id", "audio"}` jsonl works too) is run through `KimiAudio.generate_batch` with the
Evalkit's prompts and decoding settings (greedy text, repetition penalty 1.1 / 16, max_new_tokens
-1), items sharded over processes (`--process_index/--process_count`, or jax.distributed's), each
finished batch appended to `predictions.<i>-of-<n>.jsonl` (resumable: a re-run skips finished ids;
a killed run loses at most the batch in flight). Process 0 then merges into the Evalkit's
`<model>_<DATASET>.jsonl` (re-scorable with the official `run_audio.py --reeval`), scores it
(kimia_jax/evaluation: identical to the Evalkit, quirks included; `--strict` fixes its scoring
bugs), and writes the Evalkit's `_performance.json` and dump files, then `summary.json`,
`report.md` and `report.png` (ours beside the paper) in `<workdir>/<model>/`.

Judged sets (MMAU, MELD, ..., VoiceBench open-ended) need an OpenAI-compatible judge:
`--judge_base_url https://api.openai.com/v1` with OPENAI_API_KEY (gpt-4o-mini, as the paper), or any
local endpoint; every reply is cached in `<workdir>/judge_cache.jsonl` (re-scoring is free;
`--judge_replay` uses the cache only). Without a judge those sets are merged but not scored (a note
says so). `--score_only` re-merges and re-scores without loading the model.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from kimia_jax.evaluation import benchmarks, report, runner, scoring

_MODEL = flags.DEFINE_string("model_path", None, "Released or converted model folder.")
_BENCH = flags.DEFINE_string(
    "benchmarks", None, "Comma-separated DATASET_NAMEs or groups: asr, mqa, refqa, voicebench, all."
)
_DATA = flags.DEFINE_string("data_dir", None, "Root of the Evalkit manifests (dataset_root).")
_WORK = flags.DEFINE_string("workdir", None, "Output root: <workdir>/<model_name>/<DATASET>/...")
_NAME = flags.DEFINE_string("model_name", "Kimi-Audio", "Model name in file names and reports.")
_PI = flags.DEFINE_integer("process_index", None, "This process's shard (default: jax's).")
_PC = flags.DEFINE_integer("process_count", None, "Number of shards (default: jax's).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Items per generate_batch call.", lower_bound=1)
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first n manifest items (debugging).")
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", -1, "Text token budget (-1: the Evalkit's, 7500 - prompt length)."
)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. data=1,fsdp=1,tensor=8.")
_METHOD = flags.DEFINE_string(
    "method",
    "paper",
    "Scoring method: paper (what the report used per set), default/gpt-4o-mini/gpt-4o (judge), "
    "vb-mcq, vb-advbench, vb-ifeval.",
)
_STRICT = flags.DEFINE_bool("strict", False, "Fix the Evalkit's scoring bugs (not comparable).")
_SEED = flags.DEFINE_integer("seed", 0, "vb-mcq fallback seed and generation seed.", lower_bound=0)
_JUDGE_URL = flags.DEFINE_string("judge_base_url", None, "OpenAI-compatible judge endpoint.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "gpt-4o-mini", "Judge model id.")
_JUDGE_KEY = flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "Env var with the key.")
_JUDGE_CACHE = flags.DEFINE_string("judge_cache", None, "Default <workdir>/judge_cache.jsonl.")
_JUDGE_REPLAY = flags.DEFINE_bool("judge_replay", False, "Judge from the cache only.")
_SCORE_ONLY = flags.DEFINE_bool("score_only", False, "Merge and score only; no model.")
_WAIT = flags.DEFINE_float("wait_s", 86400.0, "Process 0: how long to wait for other shards.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars.")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", ["debug", "info", "warning", "error"], "Library / Orbax log lines."
)


def _set_log_level(level: str) -> None:
    import logging as py_logging

    logging.set_verbosity(level)
    quiet_jax = py_logging.ERROR if level in ("warning", "error") else py_logging.INFO
    for name in ("jax._src.xla_bridge", "jax._src.compiler"):
        py_logging.getLogger(name).setLevel(quiet_jax)


def _shard() -> tuple[int, int]:
    if _PI.value is not None or _PC.value is not None:
        i, n = _PI.value or 0, _PC.value or 1
    else:
        import jax

        i, n = jax.process_index(), jax.process_count()
    runner.shard_rows([], i, n)  # validates
    return i, n


def _load_model():
    from kimia_jax import sharding
    from kimia_jax.inference.api import KimiAudio

    mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
    return KimiAudio(
        _MODEL.value, load_detokenizer=False, dtype=_DTYPE.value, mesh=mesh, max_batch=_BATCH.value
    )


def infer_benchmark(model_box: list, bench, manifest, folder: Path, index: int, count: int) -> dict:
    """Runs this process's shard of one benchmark; returns {ok, errors, skipped, seconds, items}."""
    from tqdm import tqdm

    from kimia_jax.fileio import ResultLog
    from kimia_jax.inference import batch

    log = ResultLog(runner.predictions_path(folder, index, count), arg="predictions")
    mine = runner.shard_rows(manifest, index, count)
    skipped_rows, requests = [], []
    for n, row in enumerate(mine):
        rid = str(row["index"])
        if rid in log.done:
            continue
        try:
            too = runner.outside_duration(row["audio_path"])
        except Exception as e:  # noqa: BLE001 - an unreadable file is that item's error
            err = f"audio: {e}"
            skipped_rows.append({"id": rid, "text": None, "error": err, "status": "error"})
            continue
        if too is not None:
            skipped_rows.append(
                {
                    "id": rid,
                    "text": None,
                    "error": None,
                    "status": "skipped_duration",
                    "seconds": too,
                }
            )
            continue
        requests.append(batch.Request(rid, n, messages=runner.item_messages(row)))
    if skipped_rows:
        log.append(skipped_rows)
    stats = {
        "items": len(requests),
        "seconds": 0.0,
        "ok": 0,
        "errors": 0,
        "skipped_duration": sum(r["status"] == "skipped_duration" for r in skipped_rows),
        "already_done": len(mine) - len(requests) - len(skipped_rows),
    }
    if requests:
        if not model_box:
            model_box.append(_load_model())
        sampling = {**benchmarks.kimi_audio_sampling(), "max_new_tokens": _MAX_NEW.value}
        bar = None if _QUIET.value else tqdm(total=len(requests), desc=bench.name, unit="item")

        def on_batch(done: int, total: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        t0 = time.perf_counter()
        counts = batch.run(
            model_box[0],
            requests,
            log,
            batch_size=_BATCH.value,
            seed=_SEED.value,
            sampling=sampling,
            on_batch=on_batch,
        )
        stats["seconds"] = time.perf_counter() - t0
        stats["ok"], stats["errors"] = counts["ok"], counts["errors"]
        if bar is not None:
            bar.close()
    runner.done_marker(folder, index, count).write_text(json.dumps(stats))
    return stats


def _judge():
    from kimia_jax.evaluation.judge_client import HttpJudge, JudgeCache, ReplayJudge

    cache_path = _JUDGE_CACHE.value or str(Path(_WORK.value) / "judge_cache.jsonl")
    if _JUDGE_REPLAY.value:
        return ReplayJudge(JudgeCache(cache_path), model=_JUDGE_MODEL.value)
    if not _JUDGE_URL.value:
        return None
    key = os.environ.get(_JUDGE_KEY.value)
    return HttpJudge(
        _JUDGE_MODEL.value, _JUDGE_URL.value, api_key=key, cache=JudgeCache(cache_path)
    )


def _method(bench) -> str:
    m = _METHOD.value
    if m == "paper":
        m = bench.paper_method
    if m in ("gpt-4o-mini", "qwen2-audio-impl"):
        return "default"  # the Evalkit's file names say "default" for its default judge / ASR
    return m


def merge_and_score(bench, manifest, folder: Path, count: int, judge) -> dict[str, Any]:
    preds = runner.collect_predictions(folder)
    merged, counts = runner.merge(manifest, preds)
    result = folder / runner.merged_name(_NAME.value, bench.name)
    runner.write_merged(result, merged)
    entry: dict[str, Any] = {"dataset": bench.name, "result_file": str(result), "items": counts}
    notes = []
    if counts["skipped_duration"]:
        notes.append(
            f"note: {bench.name}: {counts['skipped_duration']} items outside the "
            "0.1-60 s duration filter scored as 'null' (as the Evalkit)"
        )
    if counts["error"] or counts["missing"]:
        notes.append(
            f"note: {bench.name}: {counts['error']} failed and {counts['missing']} "
            "missing items scored as 'null'"
        )
    method = _method(bench)
    if bench.task != "ASR" and method not in scoring.RULE_METHODS and judge is None:
        notes.append(
            f"note: {bench.name}: judged with {method} but no judge was given "
            "(--judge_base_url or --judge_replay); merged, not scored"
        )
        entry["notes"] = notes
        return entry
    try:
        ev = scoring.score_file(
            result,
            method,
            judge=judge,
            judge_model=_JUDGE_MODEL.value,
            seed=_SEED.value,
            strict=_STRICT.value,
            model=_NAME.value,
        )
    except Exception as e:  # noqa: BLE001 - one dataset's failure must not stop the others
        logging.exception("scoring %s failed", bench.name)
        notes.append(f"note: {bench.name}: scoring failed: {type(e).__name__}: {e}")
        entry["notes"] = notes
        entry["error"] = f"{type(e).__name__}: {e}"
        return entry
    files = scoring.write_outputs(result, ev)
    entry.update(performance=ev.performance, files={k: str(v) for k, v in files.items()})
    entry["notes"] = notes + ev.notes
    return entry


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _set_log_level(_LOG_LEVEL.value)
    for name, f in (("--benchmarks", _BENCH), ("--data_dir", _DATA), ("--workdir", _WORK)):
        if not f.value:
            raise app.UsageError(f"{name} is required")
    if not _SCORE_ONLY.value and not _MODEL.value:
        raise app.UsageError("--model_path is required (or --score_only to re-score)")
    if _METHOD.value not in ("paper", *scoring.JUDGE_METHODS, *scoring.RULE_METHODS):
        raise app.UsageError(
            f"--method {_METHOD.value!r}: paper, default, gpt-4o-mini, gpt-4o, "
            "vb-mcq or vb-advbench"
        )
    selected = benchmarks.select(_BENCH.value)
    index, count = (0, 1) if _SCORE_ONLY.value else _shard()
    judge = _judge() if index == 0 else None
    manifests = {}
    for bench in selected:  # every manifest checked before the model loads
        rows = benchmarks.read_manifest(benchmarks.manifest_path(_DATA.value, bench), bench)
        manifests[bench.name] = rows[: _LIMIT.value] if _LIMIT.value else rows
    model_box: list = []
    run_stats = {}
    for bench in selected:
        folder = runner.bench_dir(_WORK.value, _NAME.value, bench.name)
        folder.mkdir(parents=True, exist_ok=True)
        if not _SCORE_ONLY.value:
            s = infer_benchmark(model_box, bench, manifests[bench.name], folder, index, count)
            run_stats[bench.name] = s
            if s["items"]:
                print(
                    f"{bench.name}: {s['ok']} ok, {s['errors']} errors in {s['seconds']:.1f}s "
                    f"({s['items'] / max(s['seconds'], 1e-9):.2f} items/s)"
                )
    if index != 0:
        return
    summary: dict[str, Any] = {
        "date": str(datetime.datetime.now()),
        "model": _NAME.value,
        "model_path": _MODEL.value,
        "mode": "strict" if _STRICT.value else "official",
        "method": _METHOD.value,
        "vb_mcq_seed": _SEED.value,
        "judge_model": _JUDGE_MODEL.value if judge else None,
        "sampling": {**benchmarks.kimi_audio_sampling(), "max_new_tokens": _MAX_NEW.value},
        "process_count": count,
        "inference": run_stats,
        "benchmarks": [],
        "notes": [],
    }
    for bench in selected:
        folder = runner.bench_dir(_WORK.value, _NAME.value, bench.name)
        if not _SCORE_ONLY.value and count > 1:
            deadline = time.time() + _WAIT.value
            while not all(runner.done_marker(folder, i, count).exists() for i in range(count)):
                if time.time() > deadline:
                    raise TimeoutError(f"{bench.name}: shards not done after --wait_s")
                time.sleep(2.0)
        entry = merge_and_score(bench, manifests[bench.name], folder, count, judge)
        if not _SCORE_ONLY.value and count > 1:  # as run_audio.py: markers go once merged
            for i in range(count):
                runner.done_marker(folder, i, count).unlink(missing_ok=True)
        summary["benchmarks"].append(entry)
        summary["notes"].extend(entry.get("notes", []))
    out = Path(_WORK.value) / _NAME.value
    perfs = [e["performance"] for e in summary["benchmarks"] if "performance" in e]
    rows = report.table_rows(perfs)
    summary["table"] = rows
    summary["voicebench_avg"] = report.voicebench_avg(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    title = f"{_NAME.value} vs the Kimi-Audio report" + (
        " (strict scoring)" if _STRICT.value else ""
    )
    report.write_markdown(out / "report.md", rows, summary["notes"], title)
    report.write_plot(out / "report.png", rows, title)
    print(report.markdown(rows, summary["notes"], title))
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'}, {out / 'report.png'}")


def run() -> None:
    from kimia_jax.errors import KimiaError

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except (KimiaError, OSError) as e:
            logging.debug("failed", exc_info=True)
            print(f"error: {e}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)

    app.run(guarded)


if __name__ == "__main__":
    run()

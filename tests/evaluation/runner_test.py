"""Run-side pieces without a model: sharding, messages, manifests, merge format, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from kimia_jax.errors import ManifestError
from kimia_jax.evaluation import benchmarks, report, runner, scoring
from tests.evaluation.scoring_test import ASR, DATE


def test_shards_are_the_evalkit_rank_strides_and_cover_everything_once():
    rows = list(range(11))
    parts = [runner.shard_rows(rows, i, 3) for i in range(3)]
    assert parts[1] == [1, 4, 7, 10]
    assert sorted(sum(parts, [])) == rows
    with pytest.raises(ValueError, match="--process_index"):
        runner.shard_rows(rows, 3, 3)


def test_messages_question_then_audio_empty_question_left_out():
    q = {"audio_path": "a.wav", "question": "Please transcribe this audio."}
    assert runner.item_messages(q) == [
        {"role": "user", "message_type": "text", "content": "Please transcribe this audio."},
        {"role": "user", "message_type": "audio", "content": "a.wav"},
    ]
    assert runner.item_messages({"audio_path": ["b.wav"], "question": ""}) == [
        {"role": "user", "message_type": "audio", "content": "b.wav"}
    ]


def test_manifest_lookup_plain_jsonl_and_errors(tmp_path):
    libri = benchmarks.get("LibriSpeech")
    (tmp_path / "LibriSpeech").mkdir()
    m = tmp_path / "LibriSpeech" / "LibriSpeech.jsonl"
    m.write_text(json.dumps({"id": "u1", "audio": "x.wav", "subset": "test_clean"}) + "\n")
    assert benchmarks.manifest_path(tmp_path, libri) == m
    [row] = benchmarks.read_manifest(m, libri)
    assert row["index"] == "u1" and row["audio_path"] == str(tmp_path / "LibriSpeech" / "x.wav")
    assert row["question"] == "Please transcribe the spoken content into written text."
    vb = benchmarks.get("advbench")
    with pytest.raises(FileNotFoundError, match="no manifest for advbench"):
        benchmarks.manifest_path(tmp_path, vb)
    m.write_text(json.dumps({"index": 1, "audio_path": ["a", "b"]}) + "\n")
    with pytest.raises(ManifestError, match="exactly one audio"):
        benchmarks.read_manifest(m, libri)
    m.write_text('{"index": 1, "audio_path": "a"}\n{"index": 1, "audio_path": "b"}\n')
    with pytest.raises(ManifestError, match="repeats"):
        benchmarks.read_manifest(m, libri)
    with pytest.raises(ManifestError, match="unknown benchmark"):
        benchmarks.select("LibriSpeech,nope")


def test_duration_filter(tmp_path):
    for name, n in (("short", 1000), ("ok", 16000), ("long", 16000 * 61)):
        sf.write(tmp_path / f"{name}.wav", np.zeros(n, np.float32), 16000)
    assert runner.outside_duration(str(tmp_path / "short.wav")) == pytest.approx(1000 / 16000)
    assert runner.outside_duration(str(tmp_path / "ok.wav")) is None
    assert runner.outside_duration(str(tmp_path / "long.wav")) == pytest.approx(61.0)


def test_merge_writes_the_evalkit_format_and_rescores(tmp_path):
    """Our merge of a fixture's predictions, read back with the Evalkit's loader logic, scores
    exactly like the fixture's own merged file."""
    src = ASR / "results" / "Kimi-Audio_LibriSpeech.jsonl"
    rows = [json.loads(x) for x in src.read_text().splitlines()]
    manifest = [
        {k: v for k, v in r.items() if k not in ("prediction", "real_prompt")} for r in rows
    ]
    preds = {}
    for r in rows:
        if r["prediction"] == "null":
            preds[str(r["index"])] = {"id": str(r["index"]), "text": None, "error": None,
                                      "status": "skipped_duration"}  # fmt: skip
        else:
            preds[str(r["index"])] = {"id": str(r["index"]), "text": r["prediction"], "error": None}
    merged, counts = runner.merge(manifest, preds)
    assert counts["ok"] + counts["skipped_duration"] == len(rows) and counts["missing"] == 0
    out = tmp_path / "Kimi-Audio_LibriSpeech.jsonl"
    runner.write_merged(out, merged)
    assert not out.read_bytes().endswith(b"\n")
    back = runner.load_merged_like_evalkit(out)
    assert [(r["index"], r["prediction"]) for r in back] == [
        (r["index"], r["prediction"]) for r in rows
    ]
    assert all(
        r["real_prompt"] == (r["question"] if r["prediction"] != "null" else "") for r in back
    )
    want = scoring.score_file(src, date=DATE).performance
    assert scoring.score_file(out, date=DATE).performance == want


def test_report_table_avg_and_plot(tmp_path):
    perfs = []
    for name in report.VOICEBENCH_AVG_PARTS:
        b = benchmarks.get(name)
        key = {"alpacaeval_full": "score", "commoneval": "score"}.get(name, "acc")
        val = b.paper[name]
        if name == "ifeval":
            key, val = "final", val / 100
        perfs.append({"dataset": name, "performance": {name: {key: val}}, "eval_method": "x"})
    rows = report.table_rows(perfs)
    assert report.voicebench_avg(rows) == benchmarks.PAPER_VOICEBENCH_AVG == 76.93
    assert all(r["delta"] == 0 for r in rows)
    md = report.markdown(rows, ["note: x"], "t")
    assert "| VoiceBench | Avg | derived | 76.93 | 76.93 | 0.00 |" in md and "- note: x" in md
    report.write_plot(tmp_path / "r.png", rows, "t")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

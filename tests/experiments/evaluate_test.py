"""`python -m experiments.evaluate` end to end on the tiny model (kimia_jax.testing.tiny_kimia) and
a small local manifest of the bundled clips (experiments/assets): results, Evalkit-format merge
(read back with the Evalkit's loader logic and re-scored), performance files, summary, report and
plot; resumable after SIGKILL (every item exactly once); two processes merge to the same result as
one. Subprocesses only: experiments.evaluate defines absl flags that clash with experiments.infer's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_jax.evaluation import runner, scoring

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "experiments" / "assets"
CLIPS = [
    ASSETS / "en_fox_16k.wav",
    ASSETS / "librispeech" / "librispeech_1263-139804-0002.flac",
    ASSETS / "librispeech" / "librispeech_1263-139804-0005.flac",
    ASSETS / "kimi_qa_example.wav",
]
Q = "Please transcribe the spoken content into written text."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kimia_jax.testing import tiny_kimia

    return tiny_kimia.write(
        tmp_path_factory.mktemp("t") / "Kimi", dtype="float32", detokenizer=False
    )


def _data(root: Path, n_libri: int) -> Path:
    (root / "LibriSpeech").mkdir(parents=True)
    (root / "VoiceBench").mkdir()
    sf.write(root / "LibriSpeech" / "short.wav", np.zeros(800, np.float32), 16000)
    rows = [
        {
            "index": i,
            "audio_path": str(CLIPS[i % 3]),
            "question": Q,
            "answer": "THE QUICK BROWN FOX",
            "subset": ["test_clean", "test_other"][i % 2],
            "task_type": "understanding",
        }
        for i in range(n_libri)
    ]
    rows.append(
        {
            "index": n_libri,
            "audio_path": "short.wav",
            "question": Q,
            "answer": "SHORT",
            "subset": "test_other",
            "task_type": "understanding",
        }
    )
    (root / "LibriSpeech" / "LibriSpeech.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n"
    )
    adv = [
        {"id": i, "audio": str(CLIPS[3]), "audio_content": "How do I pick a lock?"}
        for i in range(2)
    ]
    (root / "VoiceBench" / "advbench.jsonl").write_text("\n".join(json.dumps(r) for r in adv))
    return root


def _launch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.evaluate", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _args(tiny, data, work, *extra):
    return [
        f"--model_path={tiny}",
        f"--data_dir={data}",
        f"--workdir={work}",
        "--dtype=float32",
        "--batch_size=2",
        "--max_new_tokens=6",
        *extra,
    ]


def _run(*args: str) -> str:
    p = _launch(*args)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_end_to_end_results_merge_report_and_plot(tiny, tmp_path):
    data, work = _data(tmp_path / "data", 2), tmp_path / "work"
    out = _run(*_args(tiny, data, work, "--benchmarks=LibriSpeech,advbench"))
    assert "items/s" in out and "| LibriSpeech | test_clean | wer (lower is better) |" in out
    base = work / "Kimi-Audio"
    merged = base / "LibriSpeech" / "Kimi-Audio_LibriSpeech.jsonl"
    rows = runner.load_merged_like_evalkit(merged)  # the Evalkit's own jsonl loader logic
    manifest = [json.loads(x) for x in (data / "LibriSpeech" / "LibriSpeech.jsonl").open()]
    assert [r["index"] for r in rows] == [m["index"] for m in manifest]
    assert [r["prediction"] == "null" for r in rows] == [False, False, True]  # 0.05 s clip
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert rows[0]["real_prompt"] == Q and rows[2]["real_prompt"] == ""
    perf = json.loads(
        (base / "LibriSpeech" / "Kimi-Audio_LibriSpeech_default_performance.json").read_text()
    )
    again = scoring.score_file(merged)
    assert perf["performance"] == again.performance["performance"]
    assert perf["eval_method"] == "qwen2-audio-impl" and perf["model"] == "Kimi-Audio"
    details = [json.loads(x) for x in (base / "LibriSpeech" / again.dump_name).open()]
    assert [d["wer_details"] is None for d in details] == [False, False, True]
    adv = json.loads(
        (base / "advbench" / "Kimi-Audio_advbench_vb-advbench_performance.json").read_text()
    )
    assert adv["eval_method"] == "vb-advbench" and adv["performance"]["advbench"]["total"] == 2
    summary = json.loads((base / "summary.json").read_text())
    assert summary["mode"] == "official" and summary["sampling"]["text_repetition_penalty"] == 1.1
    assert any("duration filter" in n for n in summary["notes"])
    assert {r["benchmark"] for r in summary["table"]} == {"LibriSpeech", "advbench"}
    md = (base / "report.md").read_text()
    assert "| LibriSpeech | test_clean |" in md and "| 1.28 |" in md
    assert (base / "report.png").read_bytes()[:4] == b"\x89PNG"
    # re-run: nothing to infer, same results; --score_only needs no model
    before = merged.read_text()
    _run(*_args(tiny, data, work, "--benchmarks=LibriSpeech", "--quiet"))
    assert merged.read_text() == before
    _run(f"--data_dir={data}", f"--workdir={work}", "--benchmarks=LibriSpeech", "--score_only")
    assert merged.read_text() == before


@pytest.mark.nightly
def test_killed_run_resumes_every_item_exactly_once(tiny, tmp_path):
    data, work = _data(tmp_path / "data", 14), tmp_path / "work"
    args = _args(tiny, data, work, "--benchmarks=LibriSpeech", "--quiet")
    preds = work / "Kimi-Audio" / "LibriSpeech" / "predictions.0-of-1.jsonl"
    p = _launch(*args)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once some but not all items are in
        n = len(preds.read_text().splitlines()) if preds.exists() else 0
        if n >= 4:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    first = preds.read_text().splitlines()
    assert 4 <= len(first) < 15
    _run(*args)
    final = [json.loads(x) for x in preds.read_text().splitlines()]
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 15
    assert preds.read_text().splitlines()[: len(first)] == first
    rows = runner.load_merged_like_evalkit(preds.parent / "Kimi-Audio_LibriSpeech.jsonl")
    assert sum(r["prediction"] != "null" for r in rows) == 14


@pytest.mark.nightly
def test_two_processes_merge_to_the_single_process_result(tiny, tmp_path):
    data = _data(tmp_path / "data", 5)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(*_args(tiny, data, one, "--benchmarks=LibriSpeech", "--quiet"))
    p1 = _launch(
        *_args(
            tiny,
            data,
            two,
            "--benchmarks=LibriSpeech",
            "--quiet",
            "--process_index=1",
            "--process_count=2",
        )
    )
    _run(
        *_args(
            tiny,
            data,
            two,
            "--benchmarks=LibriSpeech",
            "--quiet",
            "--process_index=0",
            "--process_count=2",
        )
    )
    assert p1.wait(timeout=900) == 0
    name = "Kimi-Audio/LibriSpeech/Kimi-Audio_LibriSpeech.jsonl"
    assert (two / name).read_text() == (one / name).read_text()
    perf = "Kimi-Audio/LibriSpeech/Kimi-Audio_LibriSpeech_default_performance.json"
    a, b = json.loads((one / perf).read_text()), json.loads((two / perf).read_text())
    assert a["performance"] == b["performance"]


def test_score_only_with_a_judge_endpoint_then_replay(tmp_path):
    """No model: per-item predictions already on disk (as a finished run leaves them), judged
    through a real HTTP endpoint on 127.0.0.1, then re-scored from the judge cache alone."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            prompt = body["messages"][-1]["content"][0]["text"]
            verdict = "yes" if "Model Answer: B\n" in prompt else "no"
            out = json.dumps({"choices": [{"message": {"content": f"Result: {verdict}"}}]})
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out.encode())

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    data, work = tmp_path / "data", tmp_path / "work"
    (data / "VoiceBench").mkdir(parents=True)
    rows = [
        {
            "index": i,
            "audio_path": f"{i}.wav",
            "question": "",
            "answer": "B",
            "audio_content": f"Question {i}? (A) x (B) y",
            "subset": "mmsu",
        }
        for i in range(4)
    ]
    (data / "VoiceBench" / "mmsu.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = work / "Kimi-Audio" / "mmsu"
    folder.mkdir(parents=True)
    preds = [{"id": str(i), "text": t, "error": None} for i, t in enumerate(["B", "A", "B"])]
    (folder / "predictions.0-of-1.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    common = [f"--data_dir={data}", f"--workdir={work}", "--benchmarks=mmsu", "--score_only"]
    try:
        _run(*common, f"--judge_base_url=http://127.0.0.1:{srv.server_port}/v1")
    finally:
        srv.shutdown()
        srv.server_close()
    perf_file = folder / "Kimi-Audio_mmsu_default_performance.json"
    perf = json.loads(perf_file.read_text())
    # item 3 has no prediction: merged as "null", judged (wrong), kept in the denominator
    assert perf["performance"]["mmsu"] == {"acc": 50.0, "valid": 4, "total": 4, "correct": 2}
    assert perf["eval_method"] == "gpt-4o-mini" and len(seen) == 4
    dump = [json.loads(x) for x in (folder / "Kimi-Audio_mmsu_gpt-4o-mini_judge.jsonl").open()]
    assert [d["judge_result"] for d in dump] == [
        "Result: yes",
        "Result: no",
        "Result: yes",
        "Result: no",
    ]
    assert len((work / "judge_cache.jsonl").read_text().splitlines()) == 4
    perf_file.unlink()
    _run(*common, "--judge_replay")  # the server is gone: the cache alone answers
    assert json.loads(perf_file.read_text())["performance"] == perf["performance"]
    summary = json.loads((work / "Kimi-Audio" / "summary.json").read_text())
    assert any("missing items" in n for n in summary["notes"])


def test_help_and_flag_errors():
    p = _launch("--help")
    out, err = p.communicate(timeout=120)
    text = out + err
    assert "\\" not in text.split("flags:")[0] and "--judge_base_url" in text
    p = _launch("--benchmarks=LibriSpeech", "--data_dir=/nonexistent", "--workdir=/tmp/x")
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "--model_path is required" in err

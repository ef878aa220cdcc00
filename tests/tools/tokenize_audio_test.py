"""End-to-end: `python -m tools.tokenize_audio` on a folder gives the reference tokens."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def test_tokenize_audio_tool(tmp_path, fixtures_dir):
    audio = fixtures_dir / "audio"
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    shutil.copy(audio / "short_16k.flac", inp / "sub" / "short.flac")
    (inp / "broken.wav").write_bytes(b"RIFF....not a wav")
    out = tmp_path / "out" / "tokens.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "tools.tokenize_audio",
        f"--input_dir={inp}",
        f"--output={out}",
        f"--tokenizer={audio / 'glm-4-voice-tokenizer'}",
        f"--whisper={audio / 'whisper-large-v3'}",
        f"--features_dir={tmp_path / 'feats'}",
    ]
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and f"{inp / 'broken.wav'}: cannot decode audio" in bad.stderr
    assert not out.exists()  # nothing half-written
    ok = subprocess.run(cmd + ["--skip_bad"], cwd=REPO, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["file"] == "sub/short.flac" and line["num_samples"] == 97928
    np.testing.assert_array_equal(
        line["tokens"], np.load(audio / "glm4_case_a.npz")["token_ids"][0]
    )
    feat = np.load(tmp_path / "feats" / "sub" / "short.flac.npy")
    want = np.load(audio / "whisper_case_a.npz")["feature"][0]
    assert feat.shape == want.shape and np.abs(feat - want).max() / np.abs(want).max() < 1e-5

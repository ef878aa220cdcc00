"""The launcher: sampling flags generated from `Sampling`; flags and paths checked before loading;
batch manifests (kill + resume); the damaged-checkpoint run ends with the error line."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import app, flags

from experiments import infer
from kimia_jax.inference.sampler import Sampling


def test_sampling_flags_are_the_sampling_fields():
    fv = flags.FLAGS
    for f in dataclasses.fields(Sampling):
        assert fv[f.name].default == f.default and fv[f.name].help == f.metadata["help"]
    try:
        fv(
            [
                "infer",
                "--model_path=/m",
                "--audio_temperature=0.8",
                "--audio_top_k=10",
                "--max_new_tokens=32",
            ]
        )
        got = infer.sampling_from_flags()
    finally:
        fv.unparse_flags()
    assert got == Sampling(audio_temperature=0.8, audio_top_k=10, max_new_tokens=32)
    assert isinstance(got.audio_temperature, float) and isinstance(got.audio_top_k, int)


# ----------------------------------------------------------------------------------------------
# Flags and paths are checked before the model loads (issue 11)


ROOT = Path(__file__).parents[2]


def _check(argv):
    fv = flags.FLAGS
    try:
        fv(["infer", *argv])
        infer.check_flags()
        return infer.sampling_from_flags()
    finally:
        fv.unparse_flags()


@pytest.fixture()
def wav(tmp_path):
    import numpy as np
    import soundfile as sf

    p = tmp_path / "a.wav"
    sf.write(p, np.zeros(1600, np.float32), 16000)
    return str(p)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--output_type=both"], "--out_wav"),  # used to drop the audio silently
        (["--out_wav=/tmp/x.wav"], "only written with --output_type both"),  # text mode
        (["--audio=/no/such.wav"], "does not exist"),
        (["--audio={tmp}"], "is a folder"),
        (["--manifest=m.jsonl"], "either --audio"),
        (["--output=r.jsonl"], "needs --manifest"),
        (["--output_type=both", "--out_wav=/no/dir/x.wav"], "cannot write into"),
        (["--voice_prompt={tmp}/a.wav"], "needs --output_type both"),
        (["--output_type=both", "--out_wav={tmp}/o.wav", "--voice_prompt=/no.wav"], "not an audio"),
    ],
)
def test_flag_errors_before_loading(wav, tmp_path, extra, words):
    argv = ["--model_path=/m", f"--audio={wav}"] + [e.format(tmp=tmp_path) for e in extra]
    if any(e.startswith("--audio=") for e in extra):
        argv.remove(f"--audio={wav}")
    if "--output=r.jsonl" in extra:
        argv.remove(f"--audio={wav}")
    with pytest.raises(app.UsageError, match=words):
        _check(argv)


def test_nan_temperature_flag_is_refused():
    from kimia_jax.errors import SamplingError

    with pytest.raises(SamplingError, match="text_temperature"):
        _check(
            ["--model_path=/m", "--audio=/m", "--text_temperature=nan"][:1]
            + ["--manifest=m", "--output=o", "--text_temperature=nan"]
        )


def test_help_has_no_collapsed_line_continuations():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.infer", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert "\\" not in text.split("flags:")[0] and "--manifest" in text and "--log_level" in text


def _launcher(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.infer", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
    from kimia_jax.conversion.kimia import convert_all
    from kimia_jax.testing import tiny_kimia

    src = tiny_kimia.write(
        tmp_path_factory.mktemp("t") / "Kimi-Audio", dtype="float32", detokenizer=False
    )
    out = tmp_path_factory.mktemp("c") / "orbax"
    convert_all(src, out, dtype="float32", detokenizer=False, log=lambda _: None)
    return out


@pytest.mark.slow
def test_damaged_checkpoint_last_line_is_the_error(tiny_converted, tmp_path, wav):
    """The launcher's last line used to be `ImportError: sys.meta_path is None` after hundreds of
    TensorStore lines."""
    import shutil

    d = tmp_path / "damaged"
    shutil.copytree(tiny_converted, d)
    blob = max((d / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    b = bytearray(blob.read_bytes())
    b[100::97] = bytes(x ^ 0xFF for x in b[100::97])
    blob.write_bytes(bytes(b))
    p = _launcher(f"--model_path={d}", f"--audio={wav}", "--dtype=float32")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1
    # no Orbax INFO lines, no TPU-backend note (the default --log_level warning)
    assert not re.search(r"^I\d{4} ", err, re.M) and "tpu" not in err.lower(), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: damaged converted checkpoint") and "is corrupted" in last, err
    assert "tools.convert_kimia" in last and "Traceback" not in err and "meta_path" not in err


@pytest.mark.slow
def test_manifest_job_killed_and_rerun_completes_without_repeats(tiny_converted, tmp_path):
    """50 requests (5 bad rows): killed with SIGKILL mid-run, re-run: 45 results + 5 errors,
    every id exactly once."""
    rows = [
        json.dumps(
            {
                "id": f"r{i:02d}",
                "messages": [{"role": "user", "message_type": "text", "content": f"hi {i}"}],
            }
        )
        for i in range(45)
    ]
    for k, bad in enumerate(
        [
            "{oops",
            json.dumps({"messages": []}),
            json.dumps({"id": "nofile", "audio": "missing.wav"}),
            json.dumps({"id": "badtask", "audio": "x.wav", "task": "sing"}),
            json.dumps(
                {
                    "id": "robot",
                    "messages": [{"role": "robot", "message_type": "text", "content": "x"}],
                }
            ),
        ]
    ):
        rows.insert(7 * k + 2, bad)
    (tmp_path / "x.wav").write_bytes(b"")
    manifest, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    args = [
        f"--model_path={tiny_converted}",
        f"--manifest={manifest}",
        f"--output={results}",
        "--dtype=float32",
        "--batch_size=2",
        "--max_new_tokens=48",
        "--quiet",
    ]
    p = _launcher(*args)
    deadline = time.time() + 400
    while time.time() < deadline:  # kill once some but not all results are in
        n = len(results.read_text().splitlines()) if results.exists() else 0
        if n >= 9:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    first = [json.loads(x) for x in results.read_text().splitlines()]
    assert 9 <= len(first) < 50
    p = _launcher(*args)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    final = [json.loads(x) for x in results.read_text().splitlines()]
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 50
    assert sum(r["error"] is None for r in final) == 45
    assert sum(r["error"] is not None for r in final) == 5
    assert final[: len(first)] == first  # nothing finished was repeated or rewritten
    assert f"{50 - len(first)}" in out or "already done" in out


def test_multi_line_answers_stay_apart():
    assert infer.format_answer("a.wav", "one line") == "a.wav: one line"
    assert infer.format_answer("a.wav", "x\ny") == "a.wav:\n  x\n  y"

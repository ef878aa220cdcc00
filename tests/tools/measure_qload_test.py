"""tools/measure_qload.py: the 7B folder bytes on paper, and (slow) the whole measurement on the
tiny shape: loading an int8 folder never holds the float weights on the device."""

from __future__ import annotations

import json

import pytest

from tests.tools.bench_train_test import run

CALL = (
    "from absl import app\n"
    "from tools import measure_qload\n"
    "sys.argv = ['measure_qload', {args}]\n"
    "try:\n"
    "    app.run(measure_qload.main)\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
)


def test_paper_7b_folder_bytes():
    """From the abstract quantized tree (`quant.abstract`); the same GB as `bench_quant --paper`
    computes from its formula."""
    r = run(CALL.format(args="'--paper'"), 300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("tensor bytes of the converted folder: bf16 19.5 GB, --quantize=int8 9.8 GB, "
            "--quantize=int4 5.5 GB") in r.stdout  # fmt: skip


@pytest.mark.slow  # ~40 s on 2 loaded cores: 7 fresh processes importing jax
def test_tiny_measurement():
    r = run(CALL.format(args="'--size=tiny'"), 600)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    load = stats["load"]
    q, fq = load["int8 folder"], load["float+quantize"]
    assert q["kind"] == fq["kind"] == load["released+quantize"]["kind"] == "int8"
    assert load["float"]["kind"] is None
    # the int8 folder's device bytes peak at the int8 params; quantizing on load holds the float
    assert q["live_peak_mib"] == q["params_mib"] == fq["params_mib"] < 0.6 * fq["live_peak_mib"]
    assert stats["disk_mib"]["int8"] < stats["disk_mib"]["bf16"]

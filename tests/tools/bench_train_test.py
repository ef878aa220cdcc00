"""tools/bench_train.py runs with the GPU image's packages: its import chain (and the modules its
sides import) never loads grain, ml_collections, tensorboardX, librosa or soundfile; the tiny shape
runs end to end in bf16 with those blocked; MFU uses the right peak."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
BLOCK = ("grain", "ml_collections", "tensorboardX", "librosa", "soundfile")
PRELUDE = f"import sys\nfor m in {BLOCK!r}:\n    sys.modules[m] = None  # import m -> ImportError\n"


def run(code: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_import_chain_avoids_packages_missing_on_the_gpu_image():
    code = (
        "import tools.bench_train\n"
        "import kimia_jax.configs, kimia_jax.models.kimia_llm, kimia_jax.models.whisper_encoder\n"
        "import kimia_jax.training.train_step, kimia_jax.training.optim\n"
        f"print('imported', sorted(m for m in {BLOCK!r} if sys.modules.get(m)))\n"
    )
    r = run(code, 300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported []" in r.stdout


def test_peak_and_mfu():
    """In a subprocess: tools modules define absl flags that clash with experiments' flags."""
    code = (
        "from tools import bench_train as bt\n"
        "assert bt.peak('gpu', 'bfloat16', None)[0] == 790_000.0\n"
        "assert bt.peak('gpu', 'float32', None)[0] == 50_000.0\n"
        "assert bt.peak('cpu', 'float32', 123.0) == (123.0, 'given')\n"
        "# 2e12 FLOP in 0.5 s on a 8000 GFLOP/s peak: 4000 GFLOP/s, MFU 50 %\n"
        "print(bt.rate(2e12, 1000, 0.5, 8000.0))\n"
    )
    r = run(code, 300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2000 tok/s, 4000.0 GFLOP/s, MFU 50.0 %" in r.stdout


@pytest.mark.slow
def test_tiny_bf16_runs_with_the_packages_blocked():
    code = (
        "from absl import app\n"
        "from tools import bench_train\n"
        "sys.argv = ['bench_train', '--sizes=tiny', '--batch=2', '--seq=32', '--rounds=1',\n"
        "            '--repeats=1', '--dtype=bfloat16', '--cache_dir=']\n"
        "app.run(bench_train.main)\n"
    )
    r = run(code, 900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bfloat16" in r.stdout and "MFU" in r.stdout and "speed-up" in r.stdout, r.stdout

"""tools/bench_quant.py runs with the GPU image's packages: its import chain never loads grain,
ml_collections, tensorboardX, librosa or soundfile (with them blocked: the 7B on paper, and in
the nightly run every variant on the tiny shape)."""

from __future__ import annotations

import pytest

from tests.tools.bench_train_test import run

CALL = (
    "from absl import app\n"
    "from tools import bench_quant\n"
    "sys.argv = ['bench_quant', {args}]\n"
    "try:\n"
    "    app.run(bench_quant.main)\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    "import kimia_jax.inference.generate, kimia_jax.layers.quant, tools.timing\n"
    "print('imported', sorted(m for m in {block!r} if sys.modules.get(m)))\n"
)
BLOCK = ("grain", "ml_collections", "tensorboardX", "librosa", "soundfile")


def test_paper_with_the_packages_blocked():
    r = run(CALL.format(args="'--paper'", block=BLOCK), 300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported []" in r.stdout
    assert "Kimi-Audio-7B LLM (9.77 B params) weights: fp32 39.1 GB, bf16 19.5 GB, int8 9.8 GB, " \
        "int4 5.5 GB" in r.stdout  # fmt: skip


@pytest.mark.nightly  # ~10 min on 2 loaded cores: 4 variants x 2 decode programs + inits
def test_tiny_all_variants_with_the_packages_blocked():
    args = "'--sizes=tiny', '--batch=1', '--steps=2', '--repeats=1'"
    r = run(CALL.format(args=args, block=BLOCK), 1200)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith(" tiny")]
    assert [x.split()[1] for x in lines] == ["fp32", "bf16", "int8", "int8_f32"], r.stdout
    # weights read per step: bf16 half of fp32; int8 (+ fp32 row scales) below bf16
    mb = [float(x.split("weights read/step")[1].split("MB")[0]) for x in lines]
    assert mb[1] < 0.51 * mb[0] and mb[2] < mb[1] and mb[2] == mb[3]

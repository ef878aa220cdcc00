"""`LossConfig.sparse` (the default): the train step computes the CE only where a loss mask is set
and skips the MIMO branch of a micro-batch without audio loss position; losses and gradients equal
the dense path's (`sparse=False`, the official computation) and the official fixtures'.

Measured (CPU, fp32):
* fixtures 00_asr (no audio loss: MIMO branch skipped) and 03_assistant_audio (both streams), the
  real step path (no `collect`, Whisper frozen): losses 1.1e-7 / 0 relative to the fixture, LLM
  gradients 8.4e-7 / 7.8e-7 relative to each tensor's largest entry (bar 1e-4), the MIMO
  gradients of 00 exactly 0.
  Sparse vs dense: losses 0 difference, gradients 3.7e-7 / 4.4e-7 (per tensor, Frobenius-relative;
  the attention key biases, whose gradient is 0 in exact arithmetic because softmax is
  shift-invariant, relative to their key weight's gradient).
* text-only rows, with and without audio targets: sparse vs dense 0 / 3.3e-7.
* nightly, [4, 64] rows with 3 Whisper windows, mixed (4 tasks) and ASR-only batches: sparse vs
  dense, also with scanned stacks + remat "full" and on 8 simulated devices (data=2, fsdp=2,
  tensor=2).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from kimia_jax import sharding
from kimia_jax.conversion import common
from kimia_jax.models import kimia_llm
from kimia_jax.training import examples as ex_lib
from kimia_jax.training import train_step as ts_lib
from kimia_jax.training.loss import LossConfig, denominators
from kimia_jax.training.train_step import TrainConfig, TrainStep
from tests.training import helpers as h
from tests.training.examples_test import codes, wav
from tests.training.fixture_test import PADDED
from tests.training.text_only_test import batches as text_only_batches


@functools.cache
def step(sparse: bool, **kw) -> TrainStep:
    lcfg, wcfg, _ = h.params()
    return TrainStep(lcfg, wcfg, TrainConfig(loss=LossConfig(sparse=sparse), **kw))


def grad_errors(got, want) -> dict[str, float]:
    """Per tensor: |got - want| / |want| (Frobenius; key biases: / |key weight gradient|)."""
    g, w = common.flatten(jax.device_get(got)), common.flatten(jax.device_get(want))
    out = {}
    for k in w:
        scale = np.linalg.norm(w[k.replace("k_proj/bias", "k_proj/weight")])
        out[k] = float(np.linalg.norm(g[k] - w[k]) / max(scale, 1e-30))
    return out


def check_equal(sparse, dense, tol: float = 1e-6) -> None:
    (ls, ms, gs), (ld, md, gd) = sparse, dense
    assert abs(float(ls) - float(ld)) <= 1e-6 * abs(float(ld))
    for k in ("loss_text", "loss_audio", "n_text", "n_audio"):
        np.testing.assert_allclose(float(ms[k]), float(md[k]), rtol=1e-6)
    errs = grad_errors(gs, gd)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, (worst, errs[worst])


@functools.cache
def fixture_batch(i: int) -> dict[str, np.ndarray]:
    ex = h.builder().official(h.records()[i], h.TRAIN_FIX)
    return ex_lib.batch_of([ex], PADDED, 1, h.PAD, packed=False)


@pytest.mark.parametrize("i", [0, 3])
def test_fixture_step_path(i):
    """The step's own path (no collect: the MIMO skip is live) against the official fixture and
    against the dense path."""
    f = h.fixture(h.NAMES[i])
    p = h.params()[2]
    loss, m, grads = step(True).loss_and_grads(p, fixture_batch(i), whisper_trainable=False)
    assert float(m["n_audio"]) == float(f["audio_loss_mask"].sum())
    for k, got in (("loss", loss), ("loss_text", m["loss_text"]), ("loss_audio", m["loss_audio"])):
        assert h.rel_err(got, f[k]) <= 1e-5, (k, got, f[k])
    grads = jax.device_get(grads)
    for key in f:
        if key.startswith("grad/") and "whisper" not in key:  # frozen here (fixture_test)
            got = h.our_grad(grads, key[len("grad/") :])
            if f[key].any():
                assert h.rel_err(got, f[key]) <= 1e-4, key
            else:  # the MIMO branch of a batch without audio targets: skipped, exact zeros
                assert float(np.abs(got).max()) == 0.0, key
    dense = step(False).loss_and_grads(p, fixture_batch(i), whisper_trainable=False)
    check_equal((loss, m, grads), dense)


def test_text_only_rows_with_and_without_audio_targets():
    none, _ = text_only_batches()  # no Whisper window
    no_audio = dict(none, audio_loss_mask=np.zeros_like(none["audio_loss_mask"]))
    p = h.params()[2]
    for b in (none, no_audio):
        check_equal(*(step(s).loss_and_grads(p, b, whisper_trainable=False) for s in (True, False)))


def test_mimo_layers_run_only_with_audio_targets():
    """A run-time count of the MIMO layer calls of the compiled forward: every MIMO layer runs
    when the batch has an audio target, none when it has none (one executable for both)."""
    calls = []

    def count(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and (mod.name or "").startswith("mimo_layers"):
            jax.debug.callback(lambda: calls.append(mod.name))
        return next_fun(*args, **kwargs)

    lcfg, wcfg, p = h.params()
    one, _ = text_only_batches()
    cfg = step(True)

    @jax.jit
    def fwd(p, b):
        with nn.intercept_methods(count):
            return ts_lib.forward_loss(
                p,
                b,
                denominators(b, cfg.cfg.loss),
                llm_cfg=cfg.llm_cfg,
                whisper_cfg=cfg.whisper_cfg,
                loss_cfg=cfg.cfg.loss,
                whisper_trainable=False,
            )[0]

    jax.block_until_ready(fwd(p, one))
    assert len(calls) == lcfg.kimia_mimo_layers > 0
    calls.clear()
    no_audio = dict(one, audio_loss_mask=np.zeros_like(one["audio_loss_mask"]))
    assert np.isfinite(float(fwd(p, no_audio)))
    assert calls == []


# --- nightly: multi-row batches, scanned + remat stacks, 8 simulated devices ---------------------


@functools.cache
def row_batches() -> dict[str, dict[str, np.ndarray]]:
    from tests.training.train_step_test import ROWS, T, W, batch

    b = h.builder()
    asr = [
        b.understanding("asr", wav(20, 1), "hello world", instruction="hi", codes=codes(20)),
        b.understanding("asr", wav(12, 2), "good", instruction="hi", codes=codes(12, 3)),
    ]
    return {"mixed": batch(), "asr": ex_lib.batch_of(asr, T, W, h.PAD, packed=False, rows=ROWS)}


@pytest.mark.nightly
@pytest.mark.parametrize("name", ["mixed", "asr"])
def test_rows_scan_remat_and_mesh_equal_the_dense_step(name):
    b = row_batches()[name]
    if name == "asr":
        assert not b["audio_loss_mask"].any() and b["text_loss_mask"].any()
    p = h.params()[2]
    dense = step(False).loss_and_grads(p, b)
    check_equal(step(True).loss_and_grads(p, b), dense)
    scan = step(True, scan_layers=True, remat_policy="full")
    loss, m, g = scan.loss_and_grads(p, b)
    g = {**g, "llm": kimia_llm.to_layout(g["llm"], scan.llm_cfg.replace(scan_layers=False))}
    check_equal((loss, m, g), dense, tol=3e-6)
    lcfg, wcfg, _ = h.params()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = TrainStep(lcfg, wcfg, TrainConfig(), mesh)
    check_equal(sharded.loss_and_grads(p, b), dense, tol=3e-6)

"""Parity with the official fine-tuning code (fixtures/training, README there): streams, labels and
loss masks token for token; losses, activations and gradients of one SFT step in fp32.

All four examples run in one padded shape [1, 272] (one compile): padding positions continue the
row index, so no real query sees them. Measured (CPU, fp32, max over the 4 fixtures): losses
1.2e-7 relative; whisper_feature 1.7e-6; inputs_embeds, norm_out, mimo_norm_out, CE and logsumexp
rows 1.3e-6; listed LLM gradients 1.1e-6, whisper gradients 3.4e-6 (bar 1e-4); per-parameter
gradient norms 5.3e-7, global norm 2.5e-7; MIMO-branch gradients of 00-02 exactly 0. The loss and
gradients come from the default sparse loss path (`LossConfig.sparse`; the collected per-position
CE is the dense one); 2026-11-27 re-measure, sparse / dense path: losses 1.2e-7 / 1.2e-7, LLM
gradients 9.8e-7 / 9.1e-7, whisper gradients 3.2e-6 / 3.5e-6 (tests/training/sparse_test.py runs
the step path without `collect`, where the MIMO skip is live).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from kimia_jax.training import examples as ex_lib
from kimia_jax.training.train_step import TrainConfig, TrainStep
from tests.training import helpers as h


@pytest.mark.parametrize("i,name", list(enumerate(h.NAMES)))
def test_streams_labels_masks_token_for_token(i, name):
    f = h.fixture(name)
    ex = h.builder().official(h.records()[i], h.TRAIN_FIX)
    np.testing.assert_array_equal(ex.audio_ids, f["audio_input_ids"][0])
    np.testing.assert_array_equal(ex.text_ids, f["text_input_ids"][0])
    np.testing.assert_array_equal(ex.is_continuous, f["is_continuous_mask"][0])
    np.testing.assert_array_equal(ex.audio_flags, f["audio_token_loss_flags"][0])
    np.testing.assert_array_equal(ex.text_flags, f["text_token_loss_flags"][0])
    lab = ex.labels(h.PAD)
    for k in ("audio_labels", "text_labels", "audio_loss_mask", "text_loss_mask"):
        np.testing.assert_array_equal(lab[k], f[k][0], err_msg=k)
    np.testing.assert_array_equal(np.nonzero(lab["text_loss_mask"])[0], f["text_loss_positions"])
    np.testing.assert_array_equal(np.nonzero(lab["audio_loss_mask"])[0], f["audio_loss_positions"])
    assert len(ex.audios) == int(f["num_audio_messages"]) == 1
    assert len(ex.audios[0]) == int(f["whisper_input_num_samples"])
    row = ex_lib.row_arrays([ex], len(ex), 1, h.PAD)
    np.testing.assert_array_equal(row["segment_ids"], 1)
    np.testing.assert_array_equal(row["positions"], np.arange(len(ex)))
    cont = np.nonzero(ex.is_continuous)[0]
    np.testing.assert_array_equal(row["cont_src"][cont], np.arange(len(cont)))
    assert (row["cont_src"][~ex.is_continuous] == -1).all()


PADDED = 272  # >= the longest fixture (267)


@functools.cache
def _step() -> TrainStep:
    lcfg, wcfg, _ = h.params()
    return TrainStep(lcfg, wcfg, TrainConfig())


@functools.cache
def _run(i: int):
    ex = h.builder().official(h.records()[i], h.TRAIN_FIX)
    batch = ex_lib.batch_of([ex], PADDED, 1, h.PAD, packed=False)
    loss, metrics, grads = _step().loss_and_grads(h.params()[2], batch, collect=True)
    t = len(ex)
    m = {k: np.asarray(v)[:, :t] if np.ndim(v) >= 2 else np.asarray(v) for k, v in metrics.items()}
    return ex, float(loss), m, grads


@pytest.mark.parametrize("i,name", list(enumerate(h.NAMES)))
def test_losses_activations_and_gradients(i, name):
    f = h.fixture(name)
    ex, loss, m, grads = _run(i)
    for k, got in (("loss", loss), ("loss_text", m["loss_text"]), ("loss_audio", m["loss_audio"])):
        assert h.rel_err(got, f[k]) <= 1e-5, (k, got, f[k])
    cont = np.nonzero(ex.is_continuous)[0]
    assert h.rel_err(m["whisper_feature"][0, cont], f["whisper_feature"][0]) <= 1e-5
    for k in ("inputs_embeds", "norm_out", "mimo_norm_out"):
        assert h.rel_err(m[k], f[k]) <= 1e-5, k
    for k in ("text_ce", "audio_ce", "text_logsumexp", "audio_logsumexp"):
        assert h.rel_err(m[k], f[k]) <= 1e-5, k
    import jax

    grads = jax.device_get(grads)
    for key in f:
        if key.startswith("grad/"):
            name_ = key[len("grad/") :]
            got = h.our_grad(grads, name_)
            if f[key].any():
                assert h.rel_err(got, f[key]) <= 1e-4, name_
            else:  # the MIMO branch without audio targets: exactly zero
                assert np.abs(got).max() <= 1e-7, name_
    norms = np.array([np.linalg.norm(h.our_grad(grads, n)) for n in f["grad_param_names"]])
    assert h.rel_err(norms, f["grad_param_norms"]) <= 1e-4
    total = np.sqrt(np.sum(norms.astype(np.float64) ** 2))
    assert h.rel_err(total, f["grad_global_norm"]) <= 1e-5

"""Batches without Whisper windows (W = 0: text-only rows, e.g. TTS or the text-only
pre-training task): the step runs no encoder and gives the loss and gradients of the same rows
carried with one unused window (W = 1, every `cont_src` < 0), the path the official fixtures check.

Measured (CPU, fp32): loss identical (0 difference), LLM gradients identical (0), encoder
gradients all zero on both sides.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from kimia_jax.training import examples as ex_lib
from kimia_jax.training.train_step import TrainConfig, TrainStep
from tests.training import helpers as h
from tests.training.examples_test import codes
from tests.training.train_step_test import max_rel

T = 32


@functools.cache
def batches() -> tuple[dict, dict]:
    b = h.builder()
    exs = [b.tts("hi", codes(10, 5)), b.tts("hello world", codes(8, 2))]
    return tuple(ex_lib.batch_of(exs, T, w, h.PAD, packed=False, rows=2) for w in (0, 1))


@functools.cache
def step() -> TrainStep:
    lcfg, wcfg, _ = h.params()
    return TrainStep(lcfg, wcfg, TrainConfig())


def check(whisper_trainable: bool) -> None:
    none, one = batches()
    assert none["whisper_wav"].shape == (2, 0, ex_lib.WINDOW_SAMPLES)
    assert (one["cont_src"] < 0).all()
    p = h.params()[2]
    loss0, m0, g0 = step().loss_and_grads(p, none, whisper_trainable=whisper_trainable)
    loss1, m1, g1 = step().loss_and_grads(p, one, whisper_trainable=whisper_trainable)
    assert np.isfinite(float(loss0)) and float(loss0) > 0
    assert abs(float(loss0) - float(loss1)) <= 1e-6 * float(loss1)
    for k in ("loss_text", "loss_audio", "n_text", "n_audio"):
        np.testing.assert_allclose(float(m0[k]), float(m1[k]), rtol=1e-6)
    assert max_rel(g0["llm"], g1["llm"]) <= 1e-6
    assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(g0["whisper"]))


def test_zero_windows_frozen_encoder():
    check(whisper_trainable=False)


@pytest.mark.slow
def test_zero_windows_trained_encoder():
    """The unfrozen phase differentiates through the (absent) encoder too."""
    check(whisper_trainable=True)

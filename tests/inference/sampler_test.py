"""Sampler vs the reference KimiASampler (torch transcription in tools/reference_loop.py)."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.inference.sampler import (
    Sampling,
    SamplingParams,
    apply_repetition_penalty,
    sample,
)

torch = pytest.importorskip("torch")
from tools.reference_loop import ref_penalised, ref_sample  # noqa: E402

pytestmark = pytest.mark.torch

V = 50
MAX = 64


def _case(seed: int, lengths: list[int]):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (len(lengths), V)).astype(np.float32)
    history = rng.integers(0, 12, (len(lengths), MAX)).astype(np.int32)  # many duplicates
    history[:, ::5] = np.argmax(logits, -1)[:, None]  # make the penalty bite the top id
    return logits, history, np.asarray(lengths, np.int32)


@pytest.mark.parametrize("penalty,window", [(1.3, 16), (1.1, 4), (1.0, 16), (0.8, 4)])
def test_repetition_penalty_matches_reference(penalty, window):
    lengths = [0, 3, window, window + 1, 40, MAX]
    logits, history, hist_len = _case(0, lengths)
    got = np.asarray(apply_repetition_penalty(logits, history, hist_len, penalty, window))
    for b, n in enumerate(lengths):
        recent = torch.from_numpy(history[b, :n]) if n > 0 else None
        want = ref_penalised(torch.from_numpy(logits[b : b + 1].copy()), recent, penalty, window)
        np.testing.assert_array_equal(got[b], want[0].numpy())  # bit-exact (same fp32 ops)
        changed = (got[b] != logits[b]).any()
        assert changed == (penalty > 1.0 and n > window), (b, n)  # strictly longer than window


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_matches_reference(penalty):
    lengths = [0, 5, 17, 33]
    logits, history, hist_len = _case(1, lengths)
    params = SamplingParams(
        temperature=0.0, top_k=5, repetition_penalty=penalty, repetition_window=16
    )
    got = np.asarray(sample(logits, history, hist_len, params, jax.random.key(0)))
    for b, n in enumerate(lengths):
        recent = torch.from_numpy(history[b, :n]) if n > 0 else None
        want = ref_sample(
            torch.from_numpy(logits[b : b + 1].copy()),
            recent,
            top_k=5,
            temperature=0.0,
            penalty=penalty,
            window=16,
        )
        assert got[b] == want.item()
    if penalty > 1.0:  # the penalty changes at least one greedy pick in this case
        plain = np.argmax(logits, -1)
        assert (got != plain).any()


def test_greedy_ties_take_first_index_and_1e6_is_greedy():
    logits = np.zeros((2, V), np.float32)
    logits[0, [7, 3, 9]] = 5.0
    logits[1, [40, 41]] = 1.0
    hist = np.zeros((2, 1), np.int32)
    for t in [0.0, 1e-6]:
        got = sample(
            logits, hist, np.zeros(2, np.int32), SamplingParams(t, 5, 1.0, 16), jax.random.key(0)
        )
        assert np.asarray(got).tolist() == [3, 40]
        want = ref_sample(
            torch.from_numpy(logits), None, top_k=5, temperature=t, penalty=1, window=1
        )
        assert want.tolist() == [3, 40]


def _draws(logits_row: np.ndarray, params: SamplingParams, n: int, seed: int = 0) -> np.ndarray:
    logits = np.broadcast_to(logits_row, (n, V))
    hist = np.zeros((n, 1), np.int32)
    return np.asarray(sample(logits, hist, np.zeros(n, np.int32), params, jax.random.key(seed)))


def test_top_k_support_and_frequencies():
    rng = np.random.default_rng(2)
    row = rng.normal(0, 1.5, V).astype(np.float32)
    params = SamplingParams(0.7, 5, 1.0, 16)
    draws = _draws(row, params, 20_000)
    ref_idx = torch.topk(torch.exp(torch.log_softmax(torch.from_numpy(row), -1) / 0.7), 5).indices
    assert set(draws.tolist()) == set(ref_idx.tolist())  # support = the reference top-k set
    # Frequencies vs softmax(lp / T) restricted to top-k (what torch.multinomial samples).
    lp = torch.log_softmax(torch.from_numpy(row), -1) / 0.7
    p = torch.softmax(lp[ref_idx], -1).numpy()
    freq = np.array([(draws == i).mean() for i in ref_idx.tolist()])
    # 20k draws: binomial std <= 0.0036; 5 sigma
    np.testing.assert_allclose(freq, p, atol=0.018)
    # The torch sampler, same seed-free check on its own draws, lands in the same set.
    g = torch.Generator().manual_seed(0)
    tdraws = [
        ref_sample(
            torch.from_numpy(row[None].copy()),
            None,
            top_k=5,
            temperature=0.7,
            penalty=1.0,
            window=1,
            generator=g,
        ).item()
        for _ in range(300)
    ]
    assert set(tdraws) <= set(ref_idx.tolist())


def test_full_distribution_when_top_k_is_zero():
    row = np.linspace(-1, 1, V).astype(np.float32)
    draws = _draws(row, SamplingParams(1.5, 0, 1.0, 16), 20_000, seed=3)
    p = torch.softmax(torch.log_softmax(torch.from_numpy(row), -1) / 1.5, -1).numpy()
    freq = np.bincount(draws, minlength=V) / draws.size
    np.testing.assert_allclose(freq, p, atol=0.006)  # p <= 0.05: std <= 0.0016
    assert len(set(draws.tolist())) > 40


def test_same_key_same_samples_other_key_differs():
    row = np.zeros(V, np.float32)
    params = SamplingParams(1.0, 20, 1.0, 16)
    a = _draws(row, params, 64, seed=7)
    b = _draws(row, params, 64, seed=7)
    c = _draws(row, params, 64, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_runs_inside_jitted_while_loop():
    """History as a fixed [B, MAX] buffer + length inside lax.while_loop, vs the same in Python."""
    rng = np.random.default_rng(4)
    steps, b = 12, 3
    logits = rng.normal(0, 1, (steps, b, V)).astype(np.float32)
    params = SamplingParams(temperature=0.0, top_k=5, repetition_penalty=2.0, repetition_window=3)

    @functools.partial(jax.jit, static_argnames="params")
    def loop(logits, params):
        def body(c):
            i, hist = c
            tok = sample(logits[i], hist, i, params, jax.random.key(0))  # scalar length
            return i + 1, hist.at[:, i].set(tok)

        return jax.lax.while_loop(
            lambda c: c[0] < steps, body, (0, jnp.zeros((b, steps), jnp.int32))
        )[1]

    got = np.asarray(loop(logits, params))
    for row in range(b):
        prev = torch.zeros(steps, dtype=torch.int)
        for i in range(steps):
            prev[i] = ref_sample(
                torch.from_numpy(logits[i, row : row + 1].copy()),
                prev[:i] if i > 0 else None,
                top_k=5,
                temperature=0.0,
                penalty=2.0,
                window=3,
            )
        assert got[row].tolist() == prev.tolist()


def test_sampling_is_the_one_set_of_defaults():
    """The official `KimiAudio.generate` defaults, and the per-stream params derived from them."""
    s = Sampling()
    assert dataclasses.asdict(s) == dict(
        audio_temperature=0.0, audio_top_k=5, text_temperature=0.0, text_top_k=5,
        audio_repetition_penalty=1.0, audio_repetition_window_size=64,
        text_repetition_penalty=1.0, text_repetition_window_size=16, max_new_tokens=-1,
    )  # fmt: skip
    assert s.text == SamplingParams(0.0, 5, 1.0, 16)
    assert s.audio == SamplingParams(0.0, 5, 1.0, 64)
    assert Sampling(audio_temperature=0.8, audio_top_k=10).audio == SamplingParams(0.8, 10, 1.0, 64)
    with pytest.raises(ValueError, match="text_repetition_window_size must be >= 1"):
        Sampling(text_repetition_window_size=0)
    with pytest.raises(TypeError, match="audio_top_k must be int"):
        Sampling(audio_top_k=2.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        Sampling(temperature=1.0)
    from kimia_jax.inference.api import KimiAudio

    sig = inspect.signature(KimiAudio.generate).parameters  # the official keyword arguments
    assert {n: sig[n].default for n in Sampling.names()} == dataclasses.asdict(s)


def test_bad_params():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(-1.0, 5, 1.0, 16)
    with pytest.raises(ValueError, match="repetition_window must be >= 1"):
        SamplingParams(0.0, 5, 1.0, 0)
    with pytest.raises(ValueError, match=r"top_k=60 exceeds the vocabulary \(50\)"):
        sample(
            np.zeros((1, V), np.float32),
            np.zeros((1, 1), np.int32),
            np.zeros(1, np.int32),
            SamplingParams(1.0, 60, 1.0, 16),
            jax.random.key(0),
        )

"""End-to-end streaming parity (DiT + vocoder + stitching), stream API, cross-fade, bad input."""

import numpy as np
import pytest

from kimia_jax.detokenizer import StitchState, hamming_periodic, plan_chunks, stitch
from tests.detokenizer_helpers import chunk_noise


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_stitched_waveform_matches_official(runs, cases, name):
    """Measured: max abs 4.5e-7 (a), 6.6e-7 (b), 4.3e-7 (c) vs the official fp32 wav_full.

    Bound 1e-5. (Fixed 900-frame cache buffer before capacity buckets: 5.4e-7, 6.0e-7, 4.2e-7.)
    """
    c = cases[name]
    pieces = runs[name]["pieces"]
    n = int(c["num_chunks"])
    assert [len(p) for p in pieces] == [int(c[f"chunk{i}_wav_len"]) for i in range(n)]
    starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]
    assert starts.tolist() == [int(c[f"chunk{i}_wav_start"]) for i in range(n)]
    wav = np.concatenate(pieces)
    assert wav.dtype == np.float32 and wav.shape == c["wav_full"].shape == (
        1920 * c["semantic_tokens"].shape[1],
    )
    err = np.abs(wav - c["wav_full"]).max()
    assert err <= 1e-5, f"case {name}: stitched waveform max abs err {err:.2e}"


def test_stream_and_whole_utterance_give_the_same_samples(detok, runs, cases):
    c = cases["a"]
    noise = chunk_noise(c)
    ref = np.concatenate(runs["a"]["pieces"])
    whole = detok.detokenize(c["semantic_tokens"], noise=noise)
    np.testing.assert_array_equal(whole, ref)  # bit-identical
    toks = c["semantic_tokens"][0]
    # Tokens arriving one by one, or in irregular groups, give the same chunks and samples.
    groups = [toks[:7], toks[7:31], toks[31:32], toks[32:]]
    pieces = list(detok.stream(groups, noise=noise))
    assert [len(p) for p in pieces] == [len(p) for p in runs["a"]["pieces"]]
    np.testing.assert_array_equal(np.concatenate(pieces), ref)
    pieces = list(detok.stream(iter(toks.tolist()), noise=lambda i, n: noise[i]))
    np.testing.assert_array_equal(np.concatenate(pieces), ref)


def test_stream_with_prng_key_matches_whole_call(detok, cases):
    import jax

    toks = cases["a"]["semantic_tokens"][0]
    key = jax.random.key(3)
    whole = detok.detokenize(toks, key=key)
    streamed = np.concatenate(list(detok.stream(iter(toks), key=key)))
    np.testing.assert_array_equal(streamed, whole)
    assert np.isfinite(whole).all() and np.abs(whole).max() > 0
    z3, z4 = detok._noise(1, 168, key, None), detok._noise(1, 168, jax.random.key(4), None)
    assert z3.shape == (168, 80) and np.abs(z3 - z4).max() > 0.1 and abs(z3.std() - 1) < 0.05


def test_vocoder_alone_matches_official(detok, cases):
    """Measured: wav max abs 3.3e-7 (bound 1e-4); intermediates checked in bigvgan_test.

    `vocode` pads every input (here to multiples of 128 frames: 16, 72, 116 -> 128) with
    valid-length masking, so these comparisons also prove the padding exact.
    """
    c = cases["a"]
    wav = detok.vocode(c["vocoder_alone_mel"])
    err = np.abs(wav - c["vocoder_alone_wav"]).max()
    assert err <= 1e-4, f"vocoder alone max abs {err:.2e}"
    for i in range(2):  # raw per-chunk vocoder outputs (before cross-fade) of the streamed run
        s, e = int(c[f"chunk{i}_vocoder_in_start"]), int(c[f"chunk{i}_vocoder_in_end"])
        w = detok.vocode(c["mel_full"][s:e])
        err = np.abs(w - c[f"chunk{i}_vocoder_out_wav"]).max()
        assert err <= 1e-4, f"chunk {i} vocoder output max abs {err:.2e}"


def test_hamming_window_is_periodic():
    """The cross-fade window is torch.hamming_window(G) (periodic): 0.54 - 0.46 cos(2 pi n / G)."""
    for g in (2, 7, 34560, 80640):
        w = hamming_periodic(g)
        n = np.arange(g)
        np.testing.assert_allclose(w, 0.54 - 0.46 * np.cos(2 * np.pi * n / g), atol=2e-7)
        assert w.dtype == np.float32
    w = hamming_periodic(34560)
    sym = np.hamming(34560).astype(np.float32)
    assert np.abs(w - sym).max() > 1e-5  # a symmetric window is detectably different
    h = len(w) // 2
    np.testing.assert_allclose(w[:h] + w[h:], 1.08, atol=1e-6)  # halves sum to 1.08 (not 1)


@pytest.mark.torch
def test_hamming_window_matches_torch():
    torch = pytest.importorskip("torch")
    for g in (34560, 80640, 97):
        ref = torch.hamming_window(g, dtype=torch.float32).numpy()
        np.testing.assert_allclose(hamming_periodic(g), ref, atol=1e-7, rtol=0)


def test_stitcher_with_synthetic_vocoder():
    """Stitching arithmetic alone: a fake vocoder (frame-index ramp), spec §4.5 chunk pattern."""

    def decode(mel):
        return np.repeat(mel[:, 0], 4).astype(np.float32)  # frame_size 4 for readability

    frames = np.arange(500, dtype=np.float32)
    mel = np.stack([frames, frames], axis=1)
    bounds = [
        (0, 72, False),
        (72, 192, False),
        (192, 312, False),
        (312, 432, False),
        (432, 500, True),
    ]
    out, state = [], StitchState()
    for s, e, f in bounds:
        piece, state = stitch(decode, 4, state, mel[s:e], f)
        out.append(piece)
    assert state == StitchState()  # reset by the final chunk
    assert [len(o) for o in out] == [
        4 * 36,
        4 * 72,
        4 * 168,
        4 * 72,
        4 * 152,
    ]  # spec §4.5 / 480 * 4
    whole = np.concatenate(out)
    assert len(whole) == 2000
    # Outside the cross-fades the ramp is reproduced exactly; inside, both decodes agree, so the
    # gain is the window-pair sum w[n + h] + w[n] (up to 1.08).
    ref = np.repeat(frames, 4)
    g = 4 * 72
    w = hamming_periodic(g)
    seg = whole[4 * 36 : 4 * 36 + g // 2]
    np.testing.assert_allclose(
        seg, ref[4 * 36 : 4 * 36 + g // 2] * (w[g // 2 :] + w[: g // 2]), rtol=1e-6
    )
    np.testing.assert_array_equal(whole[: 4 * 36], ref[: 4 * 36])


def test_odd_first_chunk_keeps_ceil_half_mel():
    decode = lambda m: np.zeros(len(m) * 480, np.float32)  # noqa: E731
    _, st = stitch(decode, 480, StitchState(), np.zeros((7, 80), np.float32), False)
    assert len(st.pre_mel) == 4 and len(st.pre_wav) == 480 * 7 // 2


def test_chunk_state_is_a_returned_value(detok):
    """detokenize_chunk returns the next state and leaves its input's fields alone; a state whose
    cache was donated cannot be used again (clear error instead of a deleted-buffer crash)."""
    toks = np.arange(60) % detok.dit_cfg.semantic_vocab_size  # plan: 30 | 30 (final)
    s0 = detok.new_state()
    wav0, s1 = detok.detokenize_chunk(s0, toks[:30], is_final=False, key=0)
    assert (s0.chunk_index, s0.start_position, s0.carry_tokens) == (0, 0, None)
    assert s1.chunk_index == 1 and s1.carry_tokens is not None and s1.cache_len > 0
    used = detok.new_state()
    used.cache_k.delete()  # what donating it to a chunk whose cache capacity stays does
    with pytest.raises(ValueError, match="already passed to detokenize_chunk"):
        detok.detokenize_chunk(used, toks[:30], is_final=False, key=0)
    wav1, s2 = detok.detokenize_chunk(s1, toks[30:], is_final=True, key=0)
    assert s2.cache_len == 0 and s2.carry_tokens is None and s2.stitch.pre_mel is None
    np.testing.assert_array_equal(np.concatenate([wav0, wav1]), detok.detokenize(toks, key=0))


def test_bad_inputs_give_clear_errors(detok):
    with pytest.raises(ValueError, match="token list is empty"):
        detok.detokenize(np.zeros((0,), np.int64))
    with pytest.raises(ValueError, match="token stream was empty"):
        list(detok.stream(iter([])))
    vocab = detok.dit_cfg.semantic_vocab_size
    with pytest.raises(
        ValueError,
        match=rf"semantic token {vocab} at position 3 is outside the semantic "
        rf"vocabulary \[0, {vocab}\)",
    ):
        detok.detokenize(np.array([1, 2, 3, vocab, 5]))
    with pytest.raises(ValueError, match="semantic token -1 at position 0"):
        detok.detokenize([-1, 2])
    with pytest.raises(ValueError, match="semantic token 152100 at position 40"):
        list(detok.stream([np.arange(40), np.array([152100])]))
    with pytest.raises(ValueError, match="must be integers"):
        detok.detokenize(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"must be \[N\] or \[1, N\]"):
        detok.detokenize(np.zeros((2, 3), np.int64))
    with pytest.raises(
        ValueError, match=r"noise for chunk 0 has shape \(10, 80\), expected \(20, 80\)"
    ):
        detok.detokenize(np.arange(5), noise=[np.zeros((10, 80))])
    with pytest.raises(ValueError, match="vocoder input must be"):
        detok.vocode(np.zeros((4, 81)))


def test_plan_chunks_matches_spec_example():
    # spec §4.5: N = 125 -> 30 | 30 | 30 | 30 | 5 (final)
    assert plan_chunks(125) == [
        (0, 30, False),
        (30, 60, False),
        (60, 90, False),
        (90, 120, False),
        (120, 125, True),
    ]
    assert plan_chunks(30) == [(0, 30, True)]
    assert plan_chunks(31) == [(0, 30, False), (30, 31, True)]
    assert plan_chunks(60) == [(0, 30, False), (30, 60, True)]

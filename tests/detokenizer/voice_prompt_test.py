"""Voice prompt (`Detokenizer.prefill`, the official `prefill`, spec §4.6) against the PyTorch
reference (tools/detok_torch_reference.py, itself checked against the official fixtures), which
computes the mel with pip bigvgan's `mel_spectrogram`.

Measured (fp32, tiny fixture checkpoint, case a tokens and noise after a 180-frame prompt: one
30-frame and one 150-frame prefill chunk, the mel zero-padded from 175 to 180 frames):
mel max abs 2.1e-6 vs bigvgan (|mel| <= 3.7; bound 1e-4); prompt K/V max rel 1.4e-6 (bound
1e-5); waveform max abs 4.5e-7 (bound 1e-5, the bound of the prompt-free parity tests). The
prompt moves the waveform by up to 0.18 (|wav| <= 0.56).
"""

import numpy as np
import pytest

from tests.detokenizer_helpers import chunk_noise

pytestmark = pytest.mark.torch


def _prompt(seed=3, seconds=3.5, n_tokens=45):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    wav = (wav + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    return wav, rng.integers(0, 1024, n_tokens)


@pytest.fixture(scope="module")
def ref(model_dir):
    torch = pytest.importorskip("torch")
    from tools.detok_torch_reference import TorchDetokenizer, import_bigvgan

    try:
        import_bigvgan()
    except ImportError:
        pytest.skip("pip bigvgan==2.4.1 is not installed")
    torch.set_num_threads(1)
    return TorchDetokenizer.from_released(model_dir)


def test_mel_matches_bigvgan(detok, ref):
    import torch
    from bigvgan.meldataset import mel_spectrogram as torch_mel

    from kimia_jax.detokenizer.mel import mel_spectrogram

    wav, _ = _prompt()
    h = ref.h
    want = torch_mel(torch.from_numpy(wav)[None], h.n_fft, h.num_mels, h.sampling_rate,
                     h.hop_size, h.win_size, h.fmin, h.fmax)[0].T.numpy()  # fmt: skip
    got = mel_spectrogram(wav, detok.vocoder_cfg)
    assert got.shape == want.shape == (175, 80)
    err = np.abs(got - want).max()
    assert err <= 1e-4, f"mel max abs {err:.2e}"


@pytest.mark.slow  # ~60-90 s on 2 loaded cores (torch reference + prompt shapes compiled)
def test_prefill_and_speech_match_reference(detok, ref, cases):
    c = cases["a"]
    wav, toks = _prompt()
    prompt = detok.prefill(wav, toks)
    assert prompt.start_position == 180 and prompt.cache_len == 180
    got = detok.detokenize(c["semantic_tokens"], noise=chunk_noise(c), prompt=prompt)
    want = ref.detokenize_audio(c["semantic_tokens"], chunk_noise(c), prompt=(wav, toks))
    # the K/V committed by the prefill (the reference's snapshot)
    for i, (k, v) in enumerate(ref.snapshot[0]):
        for ours, theirs in ((prompt.cache_k, k), (prompt.cache_v, v)):
            a = np.asarray(ours[i, 0, :180])
            b = theirs[0].numpy()
            rel = np.abs(a - b).max() / np.abs(b).max()
            assert rel <= 1e-5, f"block {i} prompt K/V rel err {rel:.2e}"
    assert got.shape == want.shape == (1920 * c["semantic_tokens"].shape[1],)
    err = np.abs(got - want).max()
    assert err <= 1e-5, f"waveform with voice prompt: max abs {err:.2e}"
    # the prompt conditions the speech, and is reusable (its buffers are never donated)
    plain = detok.detokenize(c["semantic_tokens"], noise=chunk_noise(c))
    assert np.abs(plain - got).max() > 1e-3
    again = np.concatenate(
        list(detok.stream(iter(c["semantic_tokens"][0]), noise=chunk_noise(c), prompt=prompt))
    )
    np.testing.assert_array_equal(again, got)


def test_bad_prompts(detok):
    wav, toks = _prompt()
    with pytest.raises(ValueError, match="too long"):
        detok.prefill(wav, np.zeros(1100, np.int64))
    with pytest.raises(ValueError, match="outside the semantic vocabulary"):
        detok.prefill(wav, toks + 5000)
    with pytest.raises(ValueError, match="needs the reference clip"):
        detok.prefill(None, toks)
    with pytest.raises(ValueError, match="too short"):
        detok.prefill(np.zeros(10, np.float32), toks)

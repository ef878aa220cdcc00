"""BigVGAN parity: against NVIDIA's pip `bigvgan` (same weights) and the official fixtures."""

import json
import sys
import types

import jax
import numpy as np
import pytest

from kimia_jax.models.bigvgan import BigVGAN, BigVGANConfig, ConvTranspose1d, kaiser_sinc_filter

# The released vocoder's building blocks (its first/odd stage shapes (9,5), (5,3), (4,2), 4 resblock
# kernels averaged, snakebeta), 3 stages instead of 7 to keep compile time low; tanh and conv_post
# bias ON to cover the branches the tiny fixture (clamp, no bias) leaves out.
RELEASED_LIKE = {
    "resblock": "1",
    "upsample_rates": [5, 3, 2],
    "upsample_kernel_sizes": [9, 5, 4],
    "upsample_initial_channel": 64,
    "resblock_kernel_sizes": [3, 5, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5]] * 4,
    "activation": "snakebeta",
    "snake_logscale": True,
    "use_tanh_at_final": True,
    "use_bias_at_final": True,
    "num_mels": 80,
    "sampling_rate": 24000,
    "hop_size": 480,
}


def _import_bigvgan():
    pytest.importorskip("torch")
    # pip bigvgan's utils.py imports matplotlib for plotting helpers we never call; a stand-in
    # module avoids a heavy test dependency (nothing of it is used).
    if "matplotlib" not in sys.modules:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            mpl = types.ModuleType("matplotlib")
            mpl.use = lambda *a, **k: None
            sys.modules["matplotlib"] = mpl
            sys.modules["matplotlib.pylab"] = types.ModuleType("matplotlib.pylab")
    return pytest.importorskip("bigvgan")


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(
        10
        * np.log10(
            np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)
        )
    )


@pytest.mark.torch
def test_matches_pip_bigvgan_released_structure(tmp_path):
    """pip bigvgan==2.4.1 (use_cuda_kernel=False) vs ours through the real converter.

    Measured: SNR ~130 dB, max abs ~1e-7 (bound: SNR >= 80 dB).
    """
    import torch

    bigvgan = _import_bigvgan()
    from kimia_jax.conversion.detokenizer import (
        TorchStateDictSource,
        convert_vocoder,
        read_vocoder_config,
    )

    torch.manual_seed(0)
    h = bigvgan.env.AttrDict(RELEASED_LIKE)
    ref = bigvgan.BigVGAN(h, use_cuda_kernel=False).eval()
    with torch.no_grad():  # nontrivial weights: the default init (N(0, 0.01)) gives near-silence
        for name, p in ref.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.uniform_(-0.5, 0.5)
            elif name.endswith("weight_v"):
                p.normal_(0.0, 1.0)
            elif name.endswith("weight_g"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_LIKE))
    torch.save({"generator": ref.state_dict()}, tmp_path / "model.pt")
    cfg = read_vocoder_config(tmp_path / "config.json")
    params = convert_vocoder(TorchStateDictSource(tmp_path / "model.pt", "generator"), cfg)
    mel = np.random.default_rng(1).normal(-5, 2, (1, 9, 80)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(mel.transpose(0, 2, 1))).numpy()[:, 0]
    got = np.asarray(jax.jit(BigVGAN(cfg).apply)({"params": params}, mel))
    assert got.shape == want.shape == (1, 9 * 30)
    snr = _snr_db(want, got)
    assert np.abs(want).max() > 0.05, "reference output is near-silent: the test would be weak"
    print(f"pip bigvgan parity: SNR {snr:.1f} dB, max abs {np.abs(want - got).max():.2e}")
    assert snr >= 80, f"SNR {snr:.1f} dB, max abs {np.abs(want - got).max():.2e}"


def test_intermediates_match_official_fixture(detok, cases):
    """Measured rel L2: conv_pre 3e-7, ups0 4e-7, ups1 1e-7, stages_out 2e-7 (bound 1e-5)."""
    c = cases["a"]
    apply = jax.jit(lambda p, m: detok.vocoder.apply({"params": p}, m, return_hidden=True))
    _, hid = apply(detok.params["vocoder"], c["vocoder_alone_mel"][None])
    for ours, theirs in [
        ("conv_pre", "conv_pre"),
        ("ups0", "ups0"),
        ("ups1", "ups1"),
        ("stages_out", "stages_out"),
    ]:
        got = np.asarray(hid[ours][0]).T  # NWC -> [C, T] as the fixture
        want = c["vocoder_alone_" + theirs]
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 1e-5, f"{ours}: rel L2 {rel:.2e}"


@pytest.mark.torch
def test_conv_transpose_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for k, u in [(9, 5), (4, 2), (5, 3), (48, 24)]:
        x = rng.normal(size=(2, 7, 6)).astype(np.float32)
        w = rng.normal(size=(6, 4, k)).astype(np.float32)  # torch [in, out, k]
        b = rng.normal(size=(4,)).astype(np.float32)
        want = (
            torch.nn.functional.conv_transpose1d(
                torch.from_numpy(x.transpose(0, 2, 1)),
                torch.from_numpy(w),
                torch.from_numpy(b),
                stride=u,
                padding=(k - u) // 2,
            )
            .numpy()
            .transpose(0, 2, 1)
        )
        params = {"kernel": np.transpose(w, (2, 0, 1)), "bias": b}
        got = np.asarray(ConvTranspose1d(4, k, u).apply({"params": params}, x))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert got.shape == (2, 7 * u, 4)


def test_kaiser_filter_matches_spec_values():
    want = [0.002028966, 0.009389464, -0.025543464, -0.057657375, 0.128572609, 0.4432098]
    f = kaiser_sinc_filter()
    np.testing.assert_allclose(f[:6], want, atol=1e-8)
    np.testing.assert_array_equal(f, f[::-1])
    assert abs(float(f.sum()) - 1) < 1e-6


def test_config_rejects_unsupported_values():
    with pytest.raises(ValueError, match="resblock '2' is not supported"):
        BigVGANConfig.from_dict({"resblock": "2"})
    with pytest.raises(ValueError, match="activation 'relu'"):
        BigVGANConfig.from_dict({"activation": "relu"})

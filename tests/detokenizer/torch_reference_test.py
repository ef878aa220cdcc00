"""The PyTorch reference used by tools/bench_detokenizer.py reproduces the official fixtures."""

import numpy as np
import pytest

from tests.detokenizer_helpers import chunk_noise

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("name", ["a", "c"])
def test_torch_reference_matches_official(model_dir, cases, name):
    """Measured: wav max abs ~5e-7 (bound 1e-5), i.e. a faithful reference for the benchmark."""
    torch = pytest.importorskip("torch")
    from tools.detok_torch_reference import TorchDetokenizer, import_bigvgan

    try:
        import_bigvgan()
    except ImportError:
        pytest.skip("pip bigvgan==2.4.1 is not installed")

    torch.set_num_threads(1)
    c = cases[name]
    ref = TorchDetokenizer.from_released(model_dir)
    wav = ref.detokenize_audio(c["semantic_tokens"], chunk_noise(c))
    err = np.abs(wav - c["wav_full"]).max()
    assert wav.shape == c["wav_full"].shape and err <= 1e-5, f"case {name}: max abs {err:.2e}"

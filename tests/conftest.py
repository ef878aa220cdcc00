"""Test setup: 8 simulated CPU devices for sharding tests, fp32 matmuls, shared fixtures path."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.detokenizer_helpers import DETOK_FIXTURES, MODEL_DIR, chunk_noise  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


# --- detokenizer: the tiny released-layout checkpoint and the official reference cases ---


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL_DIR


@pytest.fixture(scope="session")
def detok():
    """Loaded straight from the released folder (torch files), like the real model.

    Vocoder inputs are padded to multiples of 128 frames (2 compiles for every length the tests
    use instead of ~7): padding is exact, so this only trades test compile time for work.
    """
    pytest.importorskip("torch")
    from kimia_jax.detokenizer import Detokenizer, StreamingConfig

    return Detokenizer.from_pretrained(
        MODEL_DIR, streaming=StreamingConfig(vocoder_pad_multiple=128)
    )


@pytest.fixture(scope="session")
def cases() -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for c in "abc":
        with np.load(DETOK_FIXTURES / f"case_{c}.npz") as z:
            out[c] = {k: z[k] for k in z.files}
    return out


@pytest.fixture(scope="session")
def runs(detok, cases):
    """Each case streamed once chunk by chunk (official plan, recorded noise), with traces."""
    from kimia_jax.detokenizer import plan_chunks

    out = {}
    for name, c in cases.items():
        noise = chunk_noise(c)
        state = detok.new_state()
        traces, pieces = [], []
        for s, e, fin in plan_chunks(c["semantic_tokens"].shape[1]):
            tr = {}
            wav, state = detok.detokenize_chunk(
                state, c["semantic_tokens"][0, s:e], is_final=fin, noise=noise, trace=tr
            )
            pieces.append(wav)
            traces.append(tr)
        out[name] = {"traces": traces, "pieces": pieces}
    return out

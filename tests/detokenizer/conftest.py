"""Shared fixtures: the tiny released-layout checkpoint and the official reference cases."""

from pathlib import Path

import numpy as np
import pytest

DETOK_FIXTURES = Path(__file__).parent.parent / "fixtures" / "detokenizer"
MODEL_DIR = DETOK_FIXTURES / "Kimi-Audio-7B-Instruct"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL_DIR


@pytest.fixture(scope="session")
def detok():
    """Loaded straight from the released folder (torch files), like the real model."""
    pytest.importorskip("torch")
    from kimia_jax.detokenizer import Detokenizer

    return Detokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="session")
def cases() -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for c in "abc":
        with np.load(DETOK_FIXTURES / f"case_{c}.npz") as z:
            out[c] = {k: z[k] for k in z.files}
    return out


def chunk_noise(case: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [case[f"chunk{i}_noise"] for i in range(int(case["num_chunks"]))]


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
            pieces.append(detok.detokenize_chunk(state, c["semantic_tokens"][0, s:e], is_final=fin, noise=noise, trace=tr))
            traces.append(tr)
        out[name] = {"traces": traces, "pieces": pieces}
    return out

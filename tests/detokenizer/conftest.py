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

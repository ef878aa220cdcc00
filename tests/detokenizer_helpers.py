"""Detokenizer test helpers: the tiny released-layout checkpoint and the official cases."""

from pathlib import Path

import numpy as np

DETOK_FIXTURES = Path(__file__).parent / "fixtures" / "detokenizer"
MODEL_DIR = DETOK_FIXTURES / "Kimi-Audio-7B-Instruct"


def chunk_noise(case: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [case[f"chunk{i}_noise"] for i in range(int(case["num_chunks"]))]

"""One tiny Kimi-Audio (all five parts, float32) and one running engine for the serving tests."""

import dataclasses

import numpy as np
import pytest
import soundfile as sf

from kimia_jax.inference.api import KimiAudio
from kimia_jax.serving.engine import Engine, EngineConfig
from kimia_jax.testing import tiny_kimia

ENGINE = EngineConfig(slots=4, capacity=256, prefill_chunk=32, steps_per_tick=3, max_queue=64)


@pytest.fixture(scope="session")
def kimia(tmp_path_factory):
    # weights stored as bf16 (the tiny_kimia default, as end_to_end_test), computed in float32
    root = tiny_kimia.write(tmp_path_factory.mktemp("tiny") / "Kimi-Audio-7B-Instruct")
    model = KimiAudio(root, load_detokenizer=True, dtype="float32")
    det = model.detokenizer  # one vocoder compile for every chunk length (exact, see end_to_end)
    det.streaming = dataclasses.replace(det.streaming, vocoder_pad_multiple=128)
    return model


@pytest.fixture(scope="session")
def engine(kimia):
    eng = Engine.from_kimia(kimia, ENGINE).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory):
    """1.2 s of a 16 kHz voiced-like signal (harmonics + noise) as a wav file."""
    sr = 16000
    t = np.arange(int(1.2 * sr)) / sr
    rng = np.random.default_rng(0)
    x = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((180, 360, 540, 900)))
    x = 0.3 * x / np.abs(x).max() + 0.01 * rng.standard_normal(t.size)
    path = tmp_path_factory.mktemp("wav") / "speech.wav"
    sf.write(path, x.astype(np.float32), sr)
    return path

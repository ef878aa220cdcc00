"""KimiAudio end to end on the tiny checkpoint (all five parts, `testing/tiny_kimia`): audio in,
text + 24 kHz speech out, whole utterance and streamed."""

import numpy as np
import pytest

from kimia_jax.inference.api import KimiAudio
from kimia_jax.testing import tiny_kimia

SR = 16000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tiny_kimia.write(tmp_path_factory.mktemp("tiny") / "Kimi-Audio-7B-Instruct")
    return KimiAudio(root, load_detokenizer=True, dtype="float32")


def _chat():
    t = np.arange(SR) / SR
    wav = (0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-t)).astype(np.float32)
    return [{"role": "user", "message_type": "audio", "content": wav}]


def test_generate_both_and_stream_give_the_same_text_and_audio(tiny):
    """generate(output_type="both") returns text and a waveform of 24 kHz samples (1920 per audio
    code); generate_stream yields the same text in pieces and audio chunks whose concatenation is
    that waveform (measured max abs difference 0.0: the same chunks, noise and compiled calls)."""
    wav, text = tiny.generate(_chat(), output_type="both", seed=0)
    assert wav is not None and wav.dtype == np.float32 and np.isfinite(wav).all()
    assert len(wav) > 0 and len(wav) % 1920 == 0
    events = list(tiny.generate_stream(_chat(), output_type="both", seed=0, chunk_steps=32))
    streamed = np.concatenate([e["audio"] for e in events if e["audio"] is not None])
    assert "".join(e["text"] for e in events) == text
    assert sum(e["audio"] is not None for e in events) >= 2  # really streamed, chunk by chunk
    assert streamed.shape == wav.shape
    err = float(np.max(np.abs(streamed - wav)))
    assert err <= 1e-6, f"streamed vs whole-utterance audio: max abs diff {err:.2e}"
    steps = [e["steps"] for e in events]
    assert steps == sorted(steps)

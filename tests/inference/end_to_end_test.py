"""KimiAudio end to end on the tiny checkpoint (all five parts, `testing/tiny_kimia`): a chat in,
text + 24 kHz speech out, whole utterance and streamed."""

import dataclasses

import numpy as np
import pytest

from kimia_jax.inference.api import KimiAudio
from kimia_jax.testing import tiny_kimia

# Greedy, this prompt makes the tiny random model emit 35 audio codes within its 1500 - T steps:
# two detokenizer chunks (30 | 5 final), so the stream really goes chunk by chunk.
CHAT = [{"role": "user", "message_type": "text", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tiny_kimia.write(tmp_path_factory.mktemp("tiny") / "Kimi-Audio-7B-Instruct")
    model = KimiAudio(root, load_detokenizer=True, dtype="float32")
    # One vocoder compile for both chunks' lengths (72 and 104 frames) instead of two: the
    # padding is masked exactly (StreamingConfig.vocoder_pad_multiple), results are unchanged.
    det = model.detokenizer
    det.streaming = dataclasses.replace(det.streaming, vocoder_pad_multiple=128)
    return model


def test_generate_both_and_stream_give_the_same_text_and_audio(tiny):
    """generate(output_type="both") returns text and a 24 kHz waveform (1920 samples per audio
    code); generate_stream yields the same text in pieces and audio chunks whose concatenation is
    that waveform: measured max abs difference 0.0 (the same chunks, noise and compiled calls)."""
    wav, text = tiny.generate(CHAT, output_type="both", seed=0)
    assert wav is not None and wav.dtype == np.float32 and np.isfinite(wav).all()
    assert len(wav) > 0 and len(wav) % 1920 == 0 and np.abs(wav).max() > 0
    events = list(tiny.generate_stream(CHAT, output_type="both", seed=0, chunk_steps=256))
    audio = [e["audio"] for e in events if e["audio"] is not None]
    assert len(audio) >= 2, f"{len(wav) // 1920} codes gave {len(audio)} audio chunk(s)"
    assert "".join(e["text"] for e in events) == text
    streamed = np.concatenate(audio)
    assert streamed.shape == wav.shape
    err = float(np.max(np.abs(streamed - wav)))
    assert err <= 1e-6, f"streamed vs whole-utterance audio: max abs diff {err:.2e}"
    steps = [e["steps"] for e in events]
    assert steps == sorted(steps) and steps[-1] == tiny.timings.steps

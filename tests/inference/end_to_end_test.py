"""KimiAudio end to end on the tiny checkpoint (all five parts, `testing/tiny_kimia`): a chat in,
text + 24 kHz speech out, whole utterance and streamed."""

import dataclasses

import jax
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


@pytest.mark.slow  # ~75 s on 2 loaded cores (two spoken replies, prompt shapes compiled)
def test_voice_prompt_through_generate_and_stream(tiny, tmp_path):
    """`voice_prompt=` (a file, or the `VoicePrompt` built from it) is the detokenizer prefilled
    with the clip's GLM tokens (16 kHz) and BigVGAN mel (24 kHz); `generate` and
    `generate_stream` give the same waveform with it (max abs diff 0.0), and it changes the
    speech (the text is unchanged). Parity of the prefill itself:
    tests/detokenizer/voice_prompt_test.py."""
    import soundfile as sf

    from kimia_jax.audio.io import load_audio
    from kimia_jax.errors import OutputError

    t = np.arange(24000 * 2) / 24000
    clip = tmp_path / "voice.wav"
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 24000)
    wav, text = tiny.generate(CHAT, output_type="both", seed=0, voice_prompt=str(clip))
    plain, text0 = tiny.generate(CHAT, output_type="both", seed=0)
    assert text == text0 and wav.shape == plain.shape and np.abs(wav - plain).max() > 1e-3
    det = tiny.detokenizer
    toks = tiny.audio_tokenizer.tokenize([load_audio(str(clip))])[0]
    prompt = det.prefill(load_audio(str(clip), target_sr=24000), np.asarray(toks))
    built = tiny.voice_prompt(str(clip))
    assert prompt.start_position == built.start_position == 4 * len(toks) > 0
    np.testing.assert_array_equal(np.asarray(prompt.cache_k), np.asarray(built.cache_k))
    events = tiny.generate_stream(CHAT, output_type="both", seed=0, chunk_steps=256,
                                  voice_prompt=built)  # fmt: skip
    streamed = np.concatenate([e["audio"] for e in events if e["audio"] is not None])
    np.testing.assert_array_equal(streamed, wav)
    with pytest.raises(OutputError, match='needs output_type="both"'):
        tiny.generate(CHAT, output_type="text", voice_prompt=str(clip))


def test_int8_model_flag(tiny, tmp_path):
    """`KimiAudio(quantize="int8")` quantizes the LLM's decode matrices on load and generates
    exactly what the same model with `layers.quant.quantize(..., quant.DECODE)` params does;
    `KimiAudio(<folder converted with quantize="int8">)` loads int8 directly, same text."""
    from kimia_jax.layers import quant

    q = KimiAudio(tiny.model_path, load_detokenizer=False, dtype="float32", quantize="int8")
    flat = jax.tree_util.tree_leaves(q.params, is_leaf=lambda x: isinstance(x, quant.QWeight))
    assert sum(isinstance(x, quant.QWeight) for x in flat) == 7 * tiny.cfg.num_layers_total + 3
    assert quant.nbytes(q.params) < 0.45 * quant.nbytes(tiny.params)
    _, text = q.generate(CHAT, output_type="text", seed=0, max_new_tokens=24)
    ref = tiny.params
    try:
        tiny.params = quant.quantize(ref, "int8", modules=quant.DECODE)
        _, want = tiny.generate(CHAT, output_type="text", seed=0, max_new_tokens=24)
    finally:
        tiny.params = ref
    assert text == want
    with pytest.raises(ValueError, match="quantize must be None, 'none' or one of"):
        KimiAudio(tiny.model_path, load_detokenizer=False, quantize="int2")
    # a folder converted with --quantize=int8 loads as int8 with no quantize= and generates the
    # same text; another kind is refused before any weight is read
    from kimia_jax.conversion.kimia import convert_all
    from kimia_jax.errors import QuantizeMismatchError

    out = tmp_path / "int8"
    convert_all(tiny.model_path, out, detokenizer=False, quantize="int8", log=lambda _: None)
    direct = KimiAudio(out, load_detokenizer=False, dtype="float32")
    assert direct.quantize == q.quantize == "int8"
    assert quant.summary(direct.params) == quant.summary(q.params)
    assert direct.generate(CHAT, output_type="text", seed=0, max_new_tokens=24)[1] == text
    with pytest.raises(QuantizeMismatchError, match="holds int8 LLM weights"):
        KimiAudio(out, load_detokenizer=False, quantize="int4")


def test_int8_detokenizer_flag(tiny, monkeypatch):
    """`quantize_detokenizer="int8"` reaches `Detokenizer.from_pretrained(quantize=)` (the int8
    DiT itself: tests/detokenizer/quant_test.py); bad values are refused before loading."""
    from kimia_jax.detokenizer.detokenizer import Detokenizer

    seen = {}
    monkeypatch.setattr(Detokenizer, "from_pretrained",
                        classmethod(lambda cls, root, **kw: seen.update(kw) or "det"))  # fmt: skip
    m = KimiAudio(tiny.model_path, dtype="float32", quantize_detokenizer="int8")
    assert seen == {"quantize": "int8"} and m.detokenizer == "det"
    with pytest.raises(ValueError, match="quantize_detokenizer must be None, 'none' or 'int8'"):
        KimiAudio(tiny.model_path, quantize_detokenizer="int4")
    with pytest.raises(ValueError, match="needs load_detokenizer=True"):
        KimiAudio(tiny.model_path, load_detokenizer=False, quantize_detokenizer="int8")

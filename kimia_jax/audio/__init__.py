"""Audio front end: loading, log-mel, GLM-4-Voice tokens and whisper continuous features.

from kimia_jax.audio import load_audio, GlmTokenizer, WhisperFeatureExtractor
wav = load_audio("clip.mp3")                       # 16 kHz mono float32, librosa.load semantics
tok = GlmTokenizer.from_pretrained("glm-4-voice-tokenizer")          # HF folder or Orbax dir
ids = tok.tokenize([wav, "other.wav"])             # [int32 [N_i]], 12.5 Hz, no token offset
wf = WhisperFeatureExtractor.from_pretrained("Kimi-Audio-7B-Instruct/whisper-large-v3")
feats = wf.features([wav, "other.wav"])            # [float32 [N_i, 5120]], same N_i as ids
"""

from kimia_jax.audio.io import SAMPLE_RATE, AudioError, load_audio, split_segments, token_len
from kimia_jax.audio.tokenizer import (
    GlmTokenizer,
    WhisperFeatureExtractor,
    glm_segments,
    plan_batches,
)

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "GlmTokenizer",
    "WhisperFeatureExtractor",
    "glm_segments",
    "load_audio",
    "plan_batches",
    "split_segments",
    "token_len",
]

"""Audio front end: loading, log-mel, GLM-4-Voice tokens and whisper continuous features."""

from kimia_jax.audio.io import SAMPLE_RATE, AudioError, load_audio, split_segments, token_len
from kimia_jax.audio.tokenizer import GlmTokenizer, WhisperFeatureExtractor, glm_segments

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "GlmTokenizer",
    "WhisperFeatureExtractor",
    "glm_segments",
    "load_audio",
    "split_segments",
    "token_len",
]

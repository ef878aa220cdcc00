"""Every model config in one place: frozen dataclasses named after the released config keys.

    LlmConfig        the audio LLM (config.json at the model root)           configs/llm.py
    WhisperConfig    whisper-large-v3 and the GLM-4-Voice VQ encoder          configs/audio.py
    DiTConfig, MelNorm, BigVGANConfig, DetokenizerConfig  the detokenizer    configs/detokenizer.py
    layout           every sub-folder and file name of a model folder         configs/layout.py

Each config reads a released file through one helper (`ReleasedConfig.from_dict` / `from_file`),
which keeps the keys that are fields and raises `CheckpointError` naming the file and the missing
or bad key. Presets (tiny, 0.5b, 7b, the released encoders and detokenizer) sit beside them. This
is the bottom floor: it imports nothing of kimia_jax but `errors`.
"""

from kimia_jax.configs import layout
from kimia_jax.configs.audio import WhisperConfig, glm4_voice_tokenizer, whisper_large_v3
from kimia_jax.configs.base import DType, OutputType, ReleasedConfig, from_dict, read_file
from kimia_jax.configs.detokenizer import (
    BigVGANConfig,
    DetokenizerConfig,
    DiTConfig,
    MelNorm,
    released_detokenizer,
)
from kimia_jax.configs.llm import LlmConfig, kimia_7b, qwen25_05b_shaped, tiny

PRESETS = {"tiny": tiny, "0.5b": qwen25_05b_shaped, "7b": kimia_7b}
"""LLM presets by name (benchmarks' --sizes)."""

__all__ = [
    "PRESETS",
    "BigVGANConfig",
    "DType",
    "DetokenizerConfig",
    "DiTConfig",
    "LlmConfig",
    "MelNorm",
    "OutputType",
    "ReleasedConfig",
    "WhisperConfig",
    "from_dict",
    "glm4_voice_tokenizer",
    "kimia_7b",
    "layout",
    "qwen25_05b_shaped",
    "read_file",
    "released_detokenizer",
    "tiny",
    "whisper_large_v3",
]

"""A tiny Kimi-Audio model folder with all five parts in the released layout, generated from a seed.

    <root>/config.json, model-<i>-of-<n>.safetensors, model.safetensors.index.json   LLM (random)
    <root>/tiktoken.model, tokenizer_config.json, special_tokens_map.json           text tokenizer
    <root>/glm-4-voice-tokenizer/{config.json, model.safetensors, preprocessor_config.json}
    <root>/whisper-large-v3/{config.json, model.safetensors}
    <root>/audio_detokenizer/{config.yaml, model.pt}, <root>/vocoder/{config.json, model.pt}

Every part is generated here (`tiny_llm`, `tokenizer`, `tiny_audio`, `tiny_detokenizer`; nothing
is read from the repo's test fixtures). The parts fit together: whisper d_model 24 -> adaptor input
96, 48 GLM codes = the LLM's audio ids, 1024 detokenizer codes. Writing the detokenizer's `.pt`
files needs torch (pass `detokenizer=False` without it).
"""

from __future__ import annotations

import os
from pathlib import Path

from kimia_jax.configs import layout
from kimia_jax.testing import tiny_audio, tiny_llm


def write(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    detokenizer: bool = True,
) -> Path:
    """Writes the whole tiny model folder; returns it."""
    out_dir = Path(out_dir)
    tiny_llm.write(out_dir, seed=seed, dtype=dtype)
    tiny_audio.write_whisper(out_dir / layout.WHISPER_DIR, seed=seed + 1)
    tiny_audio.write_glm_tokenizer(out_dir / layout.GLM_TOKENIZER_DIR, seed=seed + 2)
    if detokenizer:
        from kimia_jax.testing import tiny_detokenizer

        tiny_detokenizer.write(out_dir, seed=seed + 3)
    return out_dir

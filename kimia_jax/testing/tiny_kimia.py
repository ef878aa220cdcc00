"""A tiny Kimi-Audio model folder with all five parts in the released layout.

    <root>/config.json, model-<i>-of-<n>.safetensors, model.safetensors.index.json   LLM (random)
    <root>/tiktoken.model, tokenizer_config.json, special_tokens_map.json           text tokenizer
    <root>/glm-4-voice-tokenizer/{config.json, model.safetensors, preprocessor_config.json}
    <root>/whisper-large-v3/{config.json, model.safetensors}
    <root>/audio_detokenizer/{config.yaml, model.pt}, <root>/vocoder/{config.json, model.pt}

The LLM and tokenizer are generated here from a seed (`tiny_llm`). The three audio parts are the
repo's tiny random reference checkpoints (`tests/fixtures/`, written in the released layout by
the official code, see their READMEs), copied in; they match the LLM's shapes (whisper d_model 24
-> adaptor input 96, 48 GLM codes = the LLM's audio ids, 1024 detokenizer codes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kimia_jax.testing import tiny_llm

REPO = Path(__file__).resolve().parents[2]
AUDIO_PARTS = {
    "glm-4-voice-tokenizer": REPO / "tests/fixtures/audio/glm-4-voice-tokenizer",
    "whisper-large-v3": REPO / "tests/fixtures/audio/whisper-large-v3",
    "audio_detokenizer": REPO
    / "tests/fixtures/detokenizer/Kimi-Audio-7B-Instruct/audio_detokenizer",
    "vocoder": REPO / "tests/fixtures/detokenizer/Kimi-Audio-7B-Instruct/vocoder",
}


def write(out_dir: str | os.PathLike[str], *, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Writes the whole tiny model folder; returns it."""
    out_dir = Path(out_dir)
    missing = [str(p) for p in AUDIO_PARTS.values() if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"tiny audio checkpoints missing from the repo: {missing}")
    tiny_llm.write(out_dir, seed=seed, dtype=dtype)
    for name, src in AUDIO_PARTS.items():
        shutil.copytree(src, out_dir / name, dirs_exist_ok=True)
    return out_dir

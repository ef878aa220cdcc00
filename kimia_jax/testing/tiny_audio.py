"""Tiny random audio encoders in the released layouts: `whisper-large-v3/` and
`glm-4-voice-tokenizer/` (config.json + model.safetensors [+ preprocessor_config.json]).

Generated from a seed, tensor names as the released files (`encoder.` prefix for the WhisperModel
checkpoint, none for GLM-4-Voice's WhisperVQEncoder), so `conversion.whisper.load`,
`GlmTokenizer.from_pretrained` and `WhisperFeatureExtractor.from_pretrained` read them like the
real ones. Shapes match the tiny LLM: whisper d_model 24 -> adaptor input 4 x 24 = 96; 48 GLM codes
= the LLM's 48 audio ids.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from safetensors.numpy import save_file

from kimia_jax.configs import WhisperConfig, layout
from kimia_jax.conversion.common import flatten
from kimia_jax.models.whisper_encoder import abstract_params

_HF_KEYS: dict[str, Any] = {
    "activation_dropout": 0.0, "activation_function": "gelu", "apply_spec_augment": False,
    "attention_dropout": 0.0, "bos_token_id": 62, "decoder_attention_heads": 3,
    "decoder_layers": 1, "decoder_start_token_id": 61, "dropout": 0.0, "eos_token_id": 62,
    "is_encoder_decoder": True, "max_source_positions": 1500, "max_target_positions": 448,
    "model_type": "whisper", "num_mel_bins": 128, "pad_token_id": 63, "scale_embedding": False,
    "torch_dtype": "float32", "transformers_version": "4.46.3", "vocab_size": 64,
}  # fmt: skip

# whisper-large-v3's keys at a tiny size (tests/fixtures/audio/whisper-large-v3 has the same shape).
TINY_WHISPER_CONFIG: dict[str, Any] = {
    **_HF_KEYS, "architectures": ["WhisperModel"], "d_model": 24, "encoder_attention_heads": 3,
    "encoder_ffn_dim": 72, "encoder_layers": 2, "num_hidden_layers": 2, "decoder_ffn_dim": 72,
}  # fmt: skip

# glm-4-voice-tokenizer's keys at a tiny size: pooling after layer 1, VQ after layer 3, 48 codes.
TINY_GLM_CONFIG: dict[str, Any] = {
    **_HF_KEYS, "architectures": ["WhisperVQEncoder"], "d_model": 40,
    "encoder_attention_heads": 5, "encoder_ffn_dim": 80, "encoder_layers": 3,
    "num_hidden_layers": 3, "decoder_attention_heads": 5, "decoder_ffn_dim": 80,
    "encoder_causal_attention": False, "encoder_causal_convolution": True,
    "pooling_kernel_size": 4, "pooling_position": 1, "pooling_type": "avg",
    "quantize_causal_block_size": 200, "quantize_causal_encoder": False,
    "quantize_commit_coefficient": 0.25, "quantize_ema_decay": 0.99,
    "quantize_encoder_only": True, "quantize_loss_scale": 10.0, "quantize_position": 3,
    "quantize_restart_interval": 100, "quantize_vocab_size": 48, "skip_language_detection": True,
}  # fmt: skip

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
    "sampling_rate": 16000,
}  # fmt: skip


_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def dotted(path: str, drop: tuple[str, ...] = ()) -> str:
    """Our '/'-path -> a torch state-dict name: `layers_3` -> `layers.3`, kernel/scale/embedding
    -> weight (the inverse of the converters' rule tables for these models)."""
    out = []
    for p in path.split("/"):
        if p in drop:
            continue
        m = re.fullmatch(r"(.+)_(\d+)", p)
        out.extend([m.group(1), m.group(2)] if m else [_LEAF.get(p, p)])
    return ".".join(out)


def released_name(path: str) -> str:
    """Our encoder param path -> the released tensor name (without the `encoder.` prefix)."""
    if "/" not in path:  # embed_positions, embed_positions2, codebook
        return path + ".weight"
    return dotted(path, drop=("front",))


def to_released(path: str, w: np.ndarray) -> np.ndarray:
    """Our layout -> torch layout (inverse of the converter's transforms)."""
    if path.endswith("kernel"):
        return np.transpose(w, (2, 1, 0)) if w.ndim == 3 else w.T  # Conv1d / Linear
    return w


def random_leaf(rng: np.random.Generator, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The recipe of every tiny random checkpoint: std 1/sqrt(fan_in) matrices (fan_in = all axes
    but the last), 0.1 biases, 1 +- 0.1 norm scales, N(0, 1) tables."""
    if path.endswith("bias"):
        w = 0.1 * rng.standard_normal(shape)
    elif path.endswith("scale"):
        w = 1 + 0.1 * rng.standard_normal(shape)
    elif path.endswith("kernel"):
        w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    else:
        w = rng.standard_normal(shape)
    return w.astype(np.float32)


def encoder_tensors(cfg: WhisperConfig, seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
    """Released-named fp32 tensors of a random encoder with config `cfg`."""
    rng = np.random.default_rng(seed)
    shapes = flatten(nn.unbox(abstract_params(cfg)))
    return {
        prefix + released_name(k): to_released(k, random_leaf(rng, k, tuple(s.shape)))
        for k, s in sorted(shapes.items())
    }


def write_encoder(
    out_dir: str | os.PathLike[str], config: dict[str, Any], *, seed: int = 0, prefix: str = ""
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = WhisperConfig.from_dict(config, "tiny encoder config")
    save_file(
        encoder_tensors(cfg, seed, prefix),
        str(out_dir / layout.SAFETENSORS),
        metadata={"format": "pt"},
    )
    (out_dir / layout.CONFIG_JSON).write_text(json.dumps(config, indent=2))
    return out_dir


def write_whisper(out_dir: str | os.PathLike[str], *, seed: int = 1) -> Path:
    """A tiny `whisper-large-v3/` (WhisperModel naming: `encoder.` prefix)."""
    return write_encoder(out_dir, TINY_WHISPER_CONFIG, seed=seed, prefix="encoder.")


def write_glm_tokenizer(out_dir: str | os.PathLike[str], *, seed: int = 2) -> Path:
    """A tiny `glm-4-voice-tokenizer/` (WhisperVQEncoder naming, + preprocessor_config.json)."""
    out = write_encoder(out_dir, TINY_GLM_CONFIG, seed=seed)
    (out / layout.PREPROCESSOR_CONFIG).write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return out

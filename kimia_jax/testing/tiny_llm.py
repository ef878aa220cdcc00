"""A tiny random Kimi-Audio LLM folder in the released layout (config.json + safetensors shards).

Same file names, tensor names and config keys as `moonshotai/Kimi-Audio-7B-Instruct`, so the real
loading code reads it. Special ids follow the released offsets above `num_base_tokens` (600 here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from kimia_jax.configs import LlmConfig, layout
from kimia_jax.conversion import common
from kimia_jax.conversion.llm import hf_name
from kimia_jax.models import kimia_llm
from kimia_jax.testing.tokenizer import write_tiny_tokenizer

# The tiny fixture model's config.json (tests/fixtures/llm): hidden 40, 3 + 2 layers, vocab 728.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["MoonshotKimiaForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
        "AutoModel": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
        "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
    },
    "attention_dropout": 0.0, "bos_token_id": 600, "eos_token_id": 605, "hidden_act": "silu",
    "hidden_size": 40, "initializer_range": 0.02, "intermediate_size": 88,
    "kimia_adaptor_input_dim": 96, "kimia_audio_output_vocab": 80, "kimia_media_begin": 618,
    "kimia_media_end": 620, "kimia_mimo_audiodelaytokens": 6, "kimia_mimo_layers": 2,
    "kimia_mimo_transformer_from_layer_index": 2, "kimia_text_output_vocab": 680,
    "kimia_token_offset": 680, "max_position_embeddings": 8192, "max_window_layers": 3,
    "model_type": "kimi_audio", "num_attention_heads": 5, "num_audio_special_tokens": 32,
    "num_base_tokens": 600, "num_hidden_layers": 3, "num_key_value_heads": 1, "pad_token_id": 679,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "use_sliding_window": False, "use_whisper_feature": True, "vocab_size": 728,
}  # fmt: skip


def sized_config(size: str) -> dict[str, Any]:
    """A config.json of the tiny fixture layout at `size`: "tiny" (`TINY_CONFIG`) or "0.5b" (the
    `configs.qwen25_05b_shaped` dimensions and special ids), for measurements on random folders."""
    import dataclasses

    from kimia_jax import configs

    config = dict(TINY_CONFIG)
    if size == "0.5b":
        big = dataclasses.asdict(configs.qwen25_05b_shaped())
        config.update({k: v for k, v in big.items() if k in config})
    elif size != "tiny":
        raise ValueError(f"size must be 'tiny' or '0.5b', got {size!r}")
    return config


def random_tensors(cfg: LlmConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named fp32 tensors: std 1/sqrt(fan_in) matrices, 0.1 biases, 1 +- 0.1 norm scales,
    N(0, 1) embeddings, 2/sqrt(hidden) heads (the fixture recipe)."""
    rng = np.random.default_rng(seed)
    shapes = common.flatten(nn.unbox(kimia_llm.abstract_params(cfg)))
    out = {}
    for path, s in sorted(shapes.items()):
        shape = tuple(s.shape)
        if path.startswith(("lm_head", "mimo_output")):
            w = rng.standard_normal(shape) * 2 / np.sqrt(cfg.hidden_size)
        elif path.startswith("embed_tokens"):
            w = rng.standard_normal(shape)
        elif path.endswith("bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 1 + 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[hf_name(path)] = w.astype(np.float32)
    return out


def write(
    out_dir: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    num_shards: int = 3,
    with_tokenizer: bool = True,
) -> Path:
    """Writes config.json + `model-<i>-of-<n>.safetensors` shards + index (released naming),
    and the tiny tokenizer files (tiktoken.model, tokenizer_config.json) next to them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG if config is None else config)
    cfg = LlmConfig.from_dict(config, "tiny LLM config")
    tensors = random_tensors(cfg, seed)
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    names = sorted(tensors)
    groups = [names[i::num_shards] for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = layout.safetensors_shard(i, num_shards)  # the release's irregular, unpadded names
        save_file({k: tensors[k] for k in group}, str(out_dir / fname), metadata={"format": "pt"})
        for k in group:
            weight_map[k] = fname
            total += tensors[k].nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / layout.SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    config["torch_dtype"] = dtype
    (out_dir / layout.CONFIG_JSON).write_text(json.dumps(config, indent=2))
    if with_tokenizer:
        write_tiny_tokenizer(out_dir, num_base_tokens=config["num_base_tokens"],
                             num_special_tokens=config["kimia_text_output_vocab"]
                             - config["num_base_tokens"])  # fmt: skip
    return out_dir

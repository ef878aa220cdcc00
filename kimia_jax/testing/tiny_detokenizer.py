"""A tiny random detokenizer in the released layout: `audio_detokenizer/{config.yaml, model.pt}`
(a Lightning checkpoint, DiT weights under `state_dict` as `speech_model.*`) and
`vocoder/{config.json, model.pt}` (BigVGAN `generator` state dict in weight-norm g/v form, the
anti-alias filters as the official kaiser-sinc buffers).

Generated from a seed; torch is imported only inside `write` (writing `.pt` files needs it, as
converting them does). Same config values as the repo's tiny reference detokenizer: DiT hidden 64,
2 blocks, 1024 codes; vocoder hop 480 (upsample 24 x 20).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from kimia_jax.configs import DetokenizerConfig, layout
from kimia_jax.conversion.common import flatten
from kimia_jax.conversion.detokenizer import abstract
from kimia_jax.models.bigvgan import kaiser_sinc_filter
from kimia_jax.testing.tiny_audio import dotted, random_leaf

TINY_DIT_YAML: dict[str, Any] = {
    "model": {
        "dit": {
            "input_size": 80, "semantic_vocab_size": 1024, "hidden_size": 64, "depth": 2,
            "num_heads": 2, "mlp_ratio": 4.0, "ffn_type": "vanilla_mlp", "ffn_gated_glu": False,
            "ffn_act_layer": "gelu", "ffn_conv_kernel_size": 5, "use_rope": True,
            "rope_params": {"max_position_embeddings": 4096, "rope_base": 10000.0,
                            "rope_interpolation_factor": 1.0},
            "position_embedding_type": "skip", "max_seq_len": 4096,
        }
    },
    "normalize_mel": True,
    "mel_mean": -4.5,
    "mel_std": 2.5,
}  # fmt: skip

TINY_VOCODER_JSON: dict[str, Any] = {
    "resblock": "1", "num_gpus": 0, "batch_size": 32, "learning_rate": 0.0001, "adam_b1": 0.8,
    "adam_b2": 0.99, "lr_decay": 0.9999996, "seed": 1234, "upsample_rates": [24, 20],
    "upsample_kernel_sizes": [48, 40], "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "use_tanh_at_final": False, "use_bias_at_final": False, "activation": "snakebeta",
    "snake_logscale": True, "segment_size": 24000, "num_mels": 80, "num_freq": 1025,
    "n_fft": 1920, "hop_size": 480, "win_size": 1920, "sampling_rate": 24000, "fmin": 0,
    "fmax": None, "fmax_for_loss": None, "num_workers": 4,
}  # fmt: skip


def dit_state_dict(cfg: DetokenizerConfig, seed: int = 3) -> dict[str, np.ndarray]:
    """`speech_model.*` fp32 tensors of a random DiT (torch layout)."""
    rng = np.random.default_rng(seed)
    shapes = flatten(nn.unbox(abstract(cfg)["dit"]))
    out = {}
    for k, s in sorted(shapes.items()):
        w = random_leaf(rng, k, tuple(s.shape))
        out[layout.DIT_KEY_PREFIX + dotted(k)] = w.T if k.endswith("kernel") else w
    return out


def _vocoder_name(path: str) -> str:
    name = dotted(path)
    name = name.replace(".upsample_filter", ".upsample.filter")
    name = name.replace(".downsample_filter", ".downsample.lowpass.filter")
    for p in (".alpha", ".beta"):
        if name.endswith(p):
            name = name[: -len(p)] + ".act" + p
    if name.startswith("ups."):  # ModuleList of [ConvTranspose1d]: ups.0.0.weight
        head, _, leaf = name.rpartition(".")
        name = f"{head}.0.{leaf}"
    return name


def vocoder_state_dict(cfg: DetokenizerConfig, seed: int = 4) -> dict[str, np.ndarray]:
    """BigVGAN `generator` fp32 tensors of a random vocoder, weight norm as g/v pairs."""
    rng = np.random.default_rng(seed)
    shapes = flatten(nn.unbox(abstract(cfg)["vocoder"]))
    out = {}
    for k, s in sorted(shapes.items()):
        name, shape = _vocoder_name(k), tuple(s.shape)
        if k.endswith("filter"):
            out[name] = kaiser_sinc_filter().reshape(1, 1, -1)
        elif k.endswith(("alpha", "beta")):  # snake parameters, log scale
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif k.endswith("kernel"):  # ours [k, in, out] -> torch, then weight norm v and g = |v|
            w = random_leaf(rng, k, shape)
            v = np.transpose(w, (1, 2, 0) if name.startswith("ups.") else (2, 1, 0))
            g = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(1, 2), keepdims=True))
            out[name[: -len("weight")] + "weight_v"] = np.ascontiguousarray(v)
            out[name[: -len("weight")] + "weight_g"] = g.astype(np.float32)
        else:
            out[name] = random_leaf(rng, k, shape)
    return out


def write(root: str | os.PathLike[str], *, seed: int = 3) -> Path:
    """Writes `<root>/audio_detokenizer/` and `<root>/vocoder/`; returns `root`."""
    import torch  # writing .pt files (conversion-side only)
    import yaml

    root = Path(root)
    dit_dir, voc_dir = root / layout.DIT_DIR, root / layout.VOCODER_DIR
    dit_dir.mkdir(parents=True, exist_ok=True)
    voc_dir.mkdir(parents=True, exist_ok=True)
    (dit_dir / layout.DIT_CONFIG).write_text(yaml.safe_dump(TINY_DIT_YAML, sort_keys=False))
    (voc_dir / layout.VOCODER_CONFIG).write_text(json.dumps(TINY_VOCODER_JSON, indent=4))
    cfg = DetokenizerConfig.from_released(root)

    def tensors(sd: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}

    torch.save(
        {layout.DIT_STATE_DICT_ENTRY: tensors(dit_state_dict(cfg, seed))},
        dit_dir / layout.TORCH_WEIGHTS,
    )
    torch.save(
        {layout.VOCODER_STATE_DICT_ENTRY: tensors(vocoder_state_dict(cfg, seed + 1))},
        voc_dir / layout.TORCH_WEIGHTS,
    )
    return root

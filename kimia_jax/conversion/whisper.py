"""Converters for the audio encoders: GLM-4-Voice `glm-4-voice-tokenizer` and `whisper-large-v3`.

Both are Hugging Face folders (`config.json` + `model.safetensors` or an index + shards). Source
names may carry a `model.` / `encoder.` / `model.encoder.` prefix (WhisperModel,
WhisperForConditionalGeneration, GLM-4's full WhisperVQ model); decoder tensors, the VQ EMA buffers,
and the VQ model's layers at or after `quantize_position` (+ its final `layer_norm`) are ignored, as
GLM-4-Voice's `load_quantize_encoder` does. Loading goes through `conversion.common.convert`
(every tensor used once, shapes checked, errors name the tensor).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from kimia_jax import checkpoint
from kimia_jax.conversion.common import (
    CheckpointError,
    Rule,
    SafetensorsSource,
    TensorSource,
    conv1d,
    convert,
    read_json,
    same,
    targets_for,
    unflatten,
)
from kimia_jax.models.whisper_encoder import WhisperConfig, abstract_params
from kimia_jax.sharding import shardings_for

_P = r"(?:model\.)?(?:encoder\.)?"

RULES: tuple[Rule, ...] = (
    Rule(_P + r"conv([12])\.weight", r"front/conv\1/kernel", conv1d),
    Rule(_P + r"conv([12])\.bias", r"front/conv\1/bias", same),
    Rule(_P + r"embed_positions\.weight", "embed_positions", same),
    Rule(_P + r"embed_positions2\.weight", "embed_positions2", same),
    Rule(_P + r"codebook\.weight", "codebook", same),
    Rule(_P + r"layer_norm\.weight", "layer_norm/weight", same),
    Rule(_P + r"layer_norm\.bias", "layer_norm/bias", same),
    Rule(
        _P + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
        r"layers_\1/self_attn/\2/weight",
        same,
    ),
    Rule(
        _P + r"layers\.(\d+)\.self_attn\.(q_proj|v_proj|out_proj)\.bias",
        r"layers_\1/self_attn/\2/bias",
        same,
    ),
    Rule(_P + r"layers\.(\d+)\.(fc1|fc2)\.weight", r"layers_\1/\2/weight", same),
    Rule(_P + r"layers\.(\d+)\.(fc1|fc2)\.bias", r"layers_\1/\2/bias", same),
    Rule(
        _P + r"layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.weight",
        r"layers_\1/\2/weight",
        same,
    ),
    Rule(
        _P + r"layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.bias",
        r"layers_\1/\2/bias",
        same,
    ),
)


def ignore_patterns(cfg: WhisperConfig) -> list[str]:
    """Source tensors the encoder does not use."""
    ign = [r"(?:model\.)?decoder\..*", r"proj_out\.weight"]
    if cfg.is_vq:
        ign += [_P + r"ema_count", _P + r"ema_weight", _P + r"layer_norm\.(weight|bias)"]
        ign += [
            _P + rf"layers\.{i}\..*"
            for i in range(cfg.num_layers_built, max(cfg.encoder_layers, 0) + 64)
        ]
    return ign


class _Without:
    """A source minus the tensors the encoder ignores (so they never reach the rule table)."""

    def __init__(self, source: TensorSource, ignore: list[str]):
        self._s = source
        pats = [re.compile(p) for p in ignore]
        self._names = [n for n in source.names() if not any(p.fullmatch(n) for p in pats)]

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._s.shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._s.get(name)


def _unbox(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def _shardings(boxed: Any, mesh: Mesh | None) -> Any:
    if mesh is not None:
        return shardings_for(boxed, mesh)
    dev = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: dev, _unbox(boxed))


def convert_params(
    source: TensorSource, cfg: WhisperConfig, mesh: Mesh | None = None, progress: bool = False
) -> Any:
    """Verified conversion of a (HF-named) tensor source into our nested param tree."""
    boxed = abstract_params(cfg)
    targets = targets_for(boxed, mesh)
    source = _Without(source, ignore_patterns(cfg))
    flat = convert(source, RULES, targets, progress=progress, desc="whisper")
    return unflatten(flat)


def load_config(path: str | os.PathLike[str], **overrides: Any) -> WhisperConfig:
    try:
        return WhisperConfig.from_dict(read_json(Path(path) / "config.json"), **overrides)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from e


def load(
    path: str | os.PathLike[str], mesh: Mesh | None = None, progress: bool = False, **overrides: Any
) -> tuple[WhisperConfig, Any]:
    """Loads (config, params) from a HF folder or a converted Orbax directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg = load_config(path, **overrides)
    if checkpoint.is_orbax_dir(path):
        boxed = abstract_params(cfg)
        abstract = checkpoint.abstract_like(_unbox(boxed), _shardings(boxed, mesh))
        return cfg, checkpoint.restore(path, abstract)
    return cfg, convert_params(SafetensorsSource(path), cfg, mesh, progress)


def convert_folder(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """HF folder -> Orbax dir (atomic), keeping config.json / preprocessor_config.json verbatim."""
    src = Path(src)
    cfg, params = load(src, progress=True)
    files = {
        n: (src / n).read_text()
        for n in ("config.json", "preprocessor_config.json")
        if (src / n).is_file()
    }
    kind = "glm4_voice_tokenizer" if cfg.is_vq else "whisper_encoder"
    return checkpoint.save(
        dst, params, files=files, meta={"model": kind, "source": str(src)}, overwrite=overwrite
    )

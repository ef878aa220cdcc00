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

import numpy as np
from jax.sharding import Mesh

from kimia_jax import checkpoint
from kimia_jax.configs import DType, WhisperConfig, layout
from kimia_jax.conversion.common import (
    CheckpointError,
    Rule,
    SafetensorsSource,
    TensorSource,
    conv1d,
    convert,
    same,
    targets_for,
    unflatten,
)
from kimia_jax.models.whisper_encoder import abstract_params

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
    return WhisperConfig.from_file(Path(path) / layout.CONFIG_JSON, **overrides)


def load(
    path: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
    kind: str | None = None,
) -> tuple[WhisperConfig, Any]:
    """The audio-encoder loader (whisper-large-v3 and the GLM-4-Voice VQ tokenizer): a released
    HF folder or our converted Orbax directory -> (config, params).

    Args:
      path: the encoder folder (config.json + safetensors, or config.json + Orbax params/).
      dtype: compute dtype of the encoder layers (None: the config's, "float32"); parameters stay
        float32 as released.
      mesh: place each tensor straight onto its shards; None = the first device.
      kind: "whisper" or "vq" to insist on one of the two encoders (a clear error otherwise).
    """
    path = Path(path)
    fmt = checkpoint.detect(
        path,
        released=(layout.CONFIG_JSON, layout.SAFETENSORS, layout.SAFETENSORS_INDEX),
        what="audio encoder",
    )
    cfg = load_config(path, **({"dtype": DType.parse(dtype).value} if dtype else {}))
    if kind is not None and kind != ("vq" if cfg.is_vq else "whisper"):
        want = "a GLM-4-Voice VQ tokenizer" if kind == "vq" else "a whisper encoder"
        got = "a VQ tokenizer" if cfg.is_vq else "a plain whisper encoder"
        raise CheckpointError(f"{path / layout.CONFIG_JSON}: expected {want}, this is {got}")
    if fmt is checkpoint.Format.ORBAX:
        return cfg, checkpoint.restore_model(path, abstract_params(cfg), mesh=mesh)
    return cfg, convert_params(SafetensorsSource(path), cfg, mesh, progress)


def convert_folder(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """HF folder -> Orbax dir (atomic), keeping config.json / preprocessor_config.json verbatim."""
    src = Path(src)
    cfg, params = load(src, progress=True)
    files = {
        n: (src / n).read_text()
        for n in (layout.CONFIG_JSON, layout.PREPROCESSOR_CONFIG)
        if (src / n).is_file()
    }
    kind = "glm4_voice_tokenizer" if cfg.is_vq else "whisper_encoder"
    return checkpoint.save(
        dst, params, files=files, meta={"model": kind, "source": str(src)}, overwrite=overwrite
    )

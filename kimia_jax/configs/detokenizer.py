"""The detokenizer's configs: the flow-matching DiT (`model.dit` of audio_detokenizer/config.yaml),
the mel normalization (top level of the same file), the BigVGAN vocoder (vocoder/config.json), and
presets of the released 7B-Instruct detokenizer."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kimia_jax.configs import layout
from kimia_jax.configs.base import ReleasedConfig, read_file
from kimia_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(ReleasedConfig):
    """`model.dit` of audio_detokenizer/config.yaml; field names = yaml keys (rope_params flat)."""

    input_size: int
    semantic_vocab_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn_type: str = "vanilla_mlp"
    use_rope: bool = True
    rope_max_position_embeddings: int = 4096
    rope_base: float = 10000.0
    rope_interpolation_factor: float = 1.0
    position_embedding_type: str = "skip"
    max_seq_len: int = 4096
    dtype: str = "float32"  # compute dtype; not a yaml key

    def __post_init__(self) -> None:
        # The official block only implements vanilla_mlp (others raise NotImplementedError there).
        if self.ffn_type != "vanilla_mlp":
            raise ValueError(
                f"DiT ffn_type {self.ffn_type!r} is not supported (official: vanilla_mlp only)"
            )
        if self.position_embedding_type != "skip":
            raise ValueError(
                f"DiT position_embedding_type {self.position_embedding_type!r} is not supported; "
                "the released checkpoint uses 'skip' (RoPE only)"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def rope_rows(self) -> int:
        """Rows of the official RoPE table: max_position_embeddings, cut to max_seq_len."""
        return min(self.rope_max_position_embeddings, self.max_seq_len)

    @classmethod
    def _normalize(cls, d: Mapping[str, Any]) -> Mapping[str, Any]:
        out = {k: v for k, v in d.items() if k != "rope_params"}
        rope = d.get("rope_params") or {}
        for k in ("max_position_embeddings", "rope_base", "rope_interpolation_factor"):
            if k in rope:
                out["rope_" + k.removeprefix("rope_")] = rope[k]
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class BigVGANConfig(ReleasedConfig):
    """vocoder/config.json. Field names = json keys; training-only keys are dropped.

    Defaults are the released Kimi-Audio vocoder's values (`use_tanh_at_final` / `use_bias_at_final`
    default to true as in the official code when the key is absent).
    """

    num_mels: int = 80
    upsample_initial_channel: int = 2048
    upsample_rates: tuple[int, ...] = (5, 2, 2, 2, 2, 3, 2)
    upsample_kernel_sizes: tuple[int, ...] = (9, 4, 4, 4, 4, 5, 4)
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 5, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 4
    activation: str = "snakebeta"
    snake_logscale: bool = True
    use_tanh_at_final: bool = True  # official default when the key is absent
    use_bias_at_final: bool = True
    sampling_rate: int = 24000
    hop_size: int = 480
    n_fft: int = 1920
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float | None = None
    dtype: str = "float32"  # compute dtype; not a json key

    def __post_init__(self) -> None:
        if self.resblock != "1":
            raise ValueError(
                f"BigVGAN resblock {self.resblock!r} is not supported (Kimi-Audio uses '1')"
            )
        if self.activation not in ("snake", "snakebeta"):
            raise ValueError(
                f"BigVGAN activation {self.activation!r} must be 'snake' or 'snakebeta'"
            )
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=True):
            if (k - u) % 2:
                raise ValueError(
                    f"upsample kernel {k} / rate {u}: output would not be exactly {u}x"
                )

    @property
    def hop(self) -> int:
        return math.prod(self.upsample_rates)


@dataclasses.dataclass(frozen=True)
class MelNorm(ReleasedConfig):
    """Top-level keys of audio_detokenizer/config.yaml: scalar normalization of the DiT mels."""

    normalize_mel: bool = True
    mel_mean: float = 0.0
    mel_std: float = 1.0

    def normalize(self, mel: np.ndarray) -> np.ndarray:
        """(mel - mean) / std in float32 (the official `prefill_chunk`)."""
        if not self.normalize_mel:
            return np.asarray(mel, np.float32)
        m = np.asarray(mel, np.float32)
        return ((m - np.float32(self.mel_mean)) / np.float32(self.mel_std)).astype(np.float32)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        if not self.normalize_mel:
            return x
        # float32 x * std + mean, two roundings, as torch does with Python-float scalars.
        return (x * np.float32(self.mel_std) + np.float32(self.mel_mean)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DetokenizerConfig:
    """Everything the detokenizer's two config files say: DiT, mel normalization, vocoder."""

    dit: DiTConfig
    mel_norm: MelNorm
    vocoder: BigVGANConfig

    def with_dtype(self, dtype: str) -> DetokenizerConfig:
        """Both models computing in `dtype` (parameters stay as loaded)."""
        return DetokenizerConfig(
            self.dit.replace(dtype=dtype), self.mel_norm, self.vocoder.replace(dtype=dtype)
        )

    @classmethod
    def from_files(
        cls, dit_yaml: str | os.PathLike[str], vocoder_json: str | os.PathLike[str]
    ) -> DetokenizerConfig:
        """audio_detokenizer/config.yaml + vocoder/config.json (or their converted copies)."""
        dit_yaml = Path(dit_yaml)
        d = read_file(dit_yaml)
        dit = (d.get("model") or {}).get("dit") if isinstance(d.get("model"), Mapping) else None
        if not isinstance(dit, Mapping):
            raise CheckpointError(f"{dit_yaml}: no model.dit section")
        norm = MelNorm(
            normalize_mel=bool(d.get("normalize_mel", False)),
            mel_mean=float(d.get("mel_mean", 0.0)),
            mel_std=float(d.get("mel_std", 1.0)),
        )
        return cls(
            DiTConfig.from_dict(dit, f"{dit_yaml} (model.dit)"),
            norm,
            BigVGANConfig.from_file(vocoder_json),
        )

    @classmethod
    def from_released(cls, root: str | os.PathLike[str]) -> DetokenizerConfig:
        root = Path(root)
        return cls.from_files(
            root / layout.DIT_DIR / layout.DIT_CONFIG,
            root / layout.VOCODER_DIR / layout.VOCODER_CONFIG,
        )

    @classmethod
    def from_converted(cls, path: str | os.PathLike[str]) -> DetokenizerConfig:
        path = Path(path)
        return cls.from_files(path / layout.DIT_CONFIG, path / layout.VOCODER_CONFIG_CONVERTED)


# The released 7B-Instruct detokenizer (audio_detokenizer/config.yaml, vocoder/config.json).
RELEASED_DIT_YAML: dict[str, Any] = {
    "input_size": 80, "semantic_vocab_size": 16384, "hidden_size": 2304, "depth": 16,
    "num_heads": 18, "mlp_ratio": 4.0, "ffn_type": "vanilla_mlp", "use_rope": True,
    "rope_params": {"max_position_embeddings": 4096, "rope_base": 10000.0,
                    "rope_interpolation_factor": 1.0},
    "position_embedding_type": "skip", "max_seq_len": 4096,
}  # fmt: skip
RELEASED_VOCODER_JSON: dict[str, Any] = {
    "resblock": "1", "upsample_rates": [5, 2, 2, 2, 2, 3, 2],
    "upsample_kernel_sizes": [9, 4, 4, 4, 4, 5, 4], "upsample_initial_channel": 2048,
    "resblock_kernel_sizes": [3, 5, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 4,
    "activation": "snakebeta", "snake_logscale": True, "use_tanh_at_final": False,
    "use_bias_at_final": False, "num_mels": 80, "sampling_rate": 24000, "n_fft": 1920,
    "hop_size": 480, "win_size": 1920, "fmin": 0, "fmax": None,
}  # fmt: skip
RELEASED_MEL_NORM = MelNorm(normalize_mel=True, mel_mean=-4.479605, mel_std=3.4584913)


def released_detokenizer(**dit_overrides: Any) -> DetokenizerConfig:
    """The released Kimi-Audio-7B-Instruct detokenizer (1.58 B DiT + BigVGAN-v2 vocoder)."""
    return DetokenizerConfig(
        DiTConfig.from_dict(RELEASED_DIT_YAML, "released DiT", **dit_overrides),
        RELEASED_MEL_NORM,
        BigVGANConfig.from_dict(RELEASED_VOCODER_JSON, "released vocoder"),
    )

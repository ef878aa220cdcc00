"""The audio encoders' config (keys of the released `config.json` of `whisper-large-v3` and of
GLM-4-Voice's `glm-4-voice-tokenizer`) and presets for both released encoders."""

from __future__ import annotations

import dataclasses
from typing import Any

from kimia_jax.configs.base import ReleasedConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class WhisperConfig(ReleasedConfig):
    """Whisper / WhisperVQ encoder config. Field names = keys of the released config.json.

    The VQ fields are None for a plain whisper checkpoint (whisper-large-v3).
    """

    d_model: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    encoder_layers: int
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False
    # GLM-4-Voice WhisperVQ keys (spec 4.1)
    encoder_causal_convolution: bool = False
    encoder_causal_attention: bool = False
    quantize_causal_encoder: bool = False
    quantize_causal_block_size: int | None = None
    pooling_kernel_size: int | None = None
    pooling_type: str = "avg"
    pooling_position: int | None = None
    quantize_position: int | None = None
    quantize_vocab_size: int | None = None
    quantize_encoder_only: bool = False
    # compute dtype of the encoder layers ("float32" reference, "bfloat16" official whisper runtime)
    dtype: str = "float32"
    # query rows per attention chunk (None: one block); a speed knob, results are the same
    attention_chunk: int | None = 128
    # per-layer rematerialization while the encoder trains (a name of layers.remat.REMAT_POLICIES:
    # "none", "full", ...); not a file key. Forward results are the same.
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def is_vq(self) -> bool:
        return self.quantize_vocab_size is not None

    @property
    def num_layers_built(self) -> int:
        """Layers that exist: only `quantize_position` for the VQ tokenizer (encoder-only)."""
        return self.quantize_position if self.is_vq else self.encoder_layers

    def validate(self) -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"d_model {self.d_model} not divisible by {self.encoder_attention_heads} heads"
            )
        if self.activation_function != "gelu":
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported (gelu)"
            )
        if self.scale_embedding:
            raise ValueError("scale_embedding=true is not supported (the encoder never scales)")
        if self.is_vq:
            if self.encoder_causal_attention or self.quantize_causal_encoder:
                raise ValueError(
                    "encoder_causal_attention / quantize_causal_encoder are not supported"
                )
            if None in (self.quantize_position, self.pooling_kernel_size, self.pooling_position):
                # the 12.5 Hz token rate (1280 samples per token) assumes pooling before the VQ
                raise ValueError(
                    "a VQ config needs quantize_position, pooling_position and pooling_kernel_size"
                )
            if self.quantize_position < self.pooling_position:
                raise ValueError(
                    f"quantize_position {self.quantize_position} < "
                    f"pooling_position {self.pooling_position}"
                )
            if self.pooling_type not in ("avg", "max"):
                raise ValueError(f"pooling_type {self.pooling_type!r} is not avg or max")


def whisper_large_v3(**kw: Any) -> WhisperConfig:
    """The released `whisper-large-v3` encoder (Kimi-Audio's continuous features)."""
    base: dict[str, Any] = dict(
        d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32,
        num_mel_bins=128, max_source_positions=1500,
    )  # fmt: skip
    base.update(kw)
    return WhisperConfig(**base)


def glm4_voice_tokenizer(**kw: Any) -> WhisperConfig:
    """The released `THUDM/glm-4-voice-tokenizer` VQ encoder (spec/audio_tokenizer.md §4.1)."""
    base: dict[str, Any] = dict(
        d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32,
        num_mel_bins=128, max_source_positions=1500, encoder_causal_convolution=True,
        quantize_causal_block_size=200, pooling_kernel_size=4, pooling_type="avg",
        pooling_position=16, quantize_position=16, quantize_vocab_size=16384,
        quantize_encoder_only=True,
    )  # fmt: skip
    base.update(kw)
    return WhisperConfig(**base)

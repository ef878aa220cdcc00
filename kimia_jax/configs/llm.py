"""The audio LLM's config (keys of the released `config.json`) and its presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kimia_jax.configs.base import ReleasedConfig
from kimia_jax.errors import CheckpointError

# "auto" or a `kimia_jax.layers.attention.IMPLEMENTATIONS` name (configs sit below layers).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlmConfig(ReleasedConfig):
    """Qwen2.5 trunk + MIMO audio branch + VQ adaptor (spec/llm.md §1). Names = config.json keys.

    Attributes:
      vocab_size: rows of `embed_tokens` and width of both heads (text ids, specials, audio codes).
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads:
        the Qwen2 trunk.
      rms_norm_eps: every RMSNorm and the adaptor LayerNorm.
      rope_theta: RoPE base.
      kimia_mimo_layers: extra decoder layers of the audio branch.
      kimia_mimo_transformer_from_layer_index: main layer whose output seeds the audio branch.
      kimia_adaptor_input_dim: width of the continuous whisper feature (4 x whisper d_model).
      kimia_media_begin, kimia_media_end: audio-stream ids bracketing an audio segment.
      kimia_token_offset: first audio-code id.
      use_whisper_feature: whether the adaptor exists.
      dtype: compute dtype (activations); `param_dtype`: dtype parameters are stored in.
      scan_layers, remat_policy: layer stack layout and rematerialization (not file keys).
      attention_implementation: kernel of the cache-less training-row attention (not a file
        key): "auto" (splash on TPU, cuDNN on GPU where eligible, else XLA) or "xla", "cudnn",
        "pallas" to force one (e.g. ahead-of-time compiles for TPU from a CPU host, where "auto"
        sees the CPU backend). Calls over a KV cache always choose automatically.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    kimia_mimo_layers: int
    kimia_mimo_transformer_from_layer_index: int
    kimia_adaptor_input_dim: int
    kimia_media_begin: int
    kimia_media_end: int
    kimia_token_offset: int
    kimia_text_output_vocab: int | None = None
    max_position_embeddings: int = 8192
    use_whisper_feature: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Layer stack layout and rematerialization (not config.json keys; kimia_jax.models.kimia_llm):
    # unrolled layers decode fastest on CPU; `scan_layers` (nn.scan over stacked params) compiles
    # once per stack, for training. remat_policy: one of kimia_llm.REMAT_POLICIES.
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str = "auto"

    def __post_init__(self) -> None:
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise CheckpointError(
                f"attention_implementation {self.attention_implementation!r} is not one of "
                f"{ATTENTION_IMPLEMENTATIONS}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not 0 <= self.kimia_mimo_transformer_from_layer_index < self.num_hidden_layers:
            raise CheckpointError(
                "kimia_mimo_transformer_from_layer_index "
                f"{self.kimia_mimo_transformer_from_layer_index} "
                f"is outside the {self.num_hidden_layers} main layers"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.tie_word_embeddings:
            raise CheckpointError("tie_word_embeddings=true is not the Kimi-Audio layout")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers_total(self) -> int:
        """Main layers plus MIMO layers (the KV-cache order: main first, then MIMO)."""
        return self.num_hidden_layers + self.kimia_mimo_layers

    @classmethod
    def from_json(
        cls, d: Mapping[str, Any], source: str = "config.json", **overrides: Any
    ) -> LlmConfig:
        """Same as `from_dict` (older name)."""
        return cls.from_dict(d, source, **overrides)


def tiny(**kw: Any) -> LlmConfig:
    """The tiny fixture LLM shape (tests/fixtures/llm): hidden 40, 3 + 2 layers, vocab 728."""
    base = dict(
        vocab_size=728, hidden_size=40, intermediate_size=88, num_hidden_layers=3,
        num_attention_heads=5, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e4,
        kimia_mimo_layers=2, kimia_mimo_transformer_from_layer_index=2, kimia_adaptor_input_dim=96,
        kimia_media_begin=618, kimia_media_end=620, kimia_token_offset=680,
        kimia_text_output_vocab=680, pad_token_id=679,
    )  # fmt: skip
    base.update(kw)
    return LlmConfig(**base)


def qwen25_05b_shaped(**kw: Any) -> LlmConfig:
    """A Qwen2.5-0.5B-shaped Kimi LLM (random weights; benchmarks). MIMO branch of 2 layers."""
    base = dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        kimia_mimo_layers=2,
        kimia_mimo_transformer_from_layer_index=21,
        kimia_adaptor_input_dim=5120,
        kimia_media_begin=151661,
        kimia_media_end=151663,
        kimia_token_offset=152064 - 4096,
        kimia_text_output_vocab=152064 - 4096,
    )
    base.update(kw)
    return LlmConfig(**base)


def kimia_7b(**kw: Any) -> LlmConfig:
    """The released Kimi-Audio-7B(-Instruct) LLM shape (spec/llm.md §1)."""
    base = dict(
        vocab_size=168448,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        kimia_mimo_layers=6,
        kimia_mimo_transformer_from_layer_index=21,
        kimia_adaptor_input_dim=5120,
        kimia_media_begin=151661,
        kimia_media_end=151663,
        kimia_token_offset=152064,
        kimia_text_output_vocab=152064,
        pad_token_id=152063,
    )
    base.update(kw)
    return LlmConfig(**base)

"""kimia_jax.configs: the shared from-dict/from-file helper, presets, released configs, enums."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import pytest

from kimia_jax import configs
from kimia_jax.configs import (
    PRESETS,
    BigVGANConfig,
    DetokenizerConfig,
    DiTConfig,
    DType,
    LlmConfig,
    OutputType,
    WhisperConfig,
    layout,
)
from kimia_jax.errors import CheckpointError

FIX = Path(__file__).parent / "fixtures"
DETOK_ROOT = FIX / "detokenizer" / "Kimi-Audio-7B-Instruct"

WHISPER_MIN = dict(d_model=8, encoder_attention_heads=2, encoder_ffn_dim=16, encoder_layers=1)


# ---------------------------------------------------------------------------------------------
# The shared helper


def test_missing_required_keys_name_source_and_keys():
    d = json.loads((FIX / "llm" / "config.json").read_text())
    del d["hidden_size"], d["rope_theta"]
    with pytest.raises(
        CheckpointError,
        match=re.escape("my/config.json: missing required config key(s) ['hidden_size', "
                        "'rope_theta']"),
    ):  # fmt: skip
        LlmConfig.from_dict(d, "my/config.json")
    for cls, d in ((WhisperConfig, {"d_model": 8}), (DiTConfig, {"hidden_size": 64})):
        with pytest.raises(CheckpointError, match=r"x\.cfg: missing required config key\(s\)"):
            cls.from_dict(d, "x.cfg")


def test_unknown_keys_are_ignored_lists_become_tuples_and_overrides_apply():
    cfg = BigVGANConfig.from_dict(
        {"upsample_rates": [24, 20], "upsample_kernel_sizes": [48, 40], "num_gpus": 3,
         "resblock_dilation_sizes": [[1, 3, 5]] * 4}, dtype="bfloat16",
    )  # fmt: skip
    assert cfg.upsample_rates == (24, 20) and cfg.hop == 480
    assert cfg.resblock_dilation_sizes == ((1, 3, 5),) * 4
    assert cfg.dtype == "bfloat16"
    hash(cfg)  # frozen and hashable (used as a static jit argument)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_mels = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"has no field\(s\) \['nope'\]"):
        WhisperConfig.from_dict(WHISPER_MIN, nope=1)


def test_bad_values_are_checkpoint_errors_naming_the_source():
    with pytest.raises(CheckpointError, match=r"^w\.json: d_model 9 not divisible by 2 heads"):
        WhisperConfig.from_dict({**WHISPER_MIN, "d_model": 9}, "w.json")
    with pytest.raises(CheckpointError, match=r"^l\.json: hidden_size 41 is not divisible"):
        LlmConfig.from_dict(configs.tiny().__dict__ | {"hidden_size": 41}, "l.json")
    with pytest.raises(CheckpointError, match="resblock '2' is not supported"):
        BigVGANConfig.from_dict({"resblock": "2"}, "v.json")
    with pytest.raises(CheckpointError, match=r"^d: expected a mapping of config keys, got list"):
        DiTConfig.from_dict([1, 2], "d")  # type: ignore[arg-type]


def test_dit_rope_params_are_flattened():
    cfg = DiTConfig.from_dict(
        {"input_size": 80, "semantic_vocab_size": 10, "hidden_size": 8, "depth": 1,
         "num_heads": 2, "rope_params": {"max_position_embeddings": 100, "rope_base": 500.0}},
    )  # fmt: skip
    assert (cfg.rope_max_position_embeddings, cfg.rope_base) == (100, 500.0)
    assert cfg.rope_rows == 100 and cfg.head_dim == 4


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'config.json'} is missing")):
        LlmConfig.from_file(tmp_path)  # a directory means its config.json
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'config.json'} is not "
                                                        "valid JSON")):  # fmt: skip
        LlmConfig.from_file(tmp_path / "config.json")
    (tmp_path / "a.yaml").write_text("model: [unclosed\n")
    with pytest.raises(CheckpointError, match="a.yaml is not valid YAML"):
        DiTConfig.from_file(tmp_path / "a.yaml", section=("model", "dit"))
    (tmp_path / "b.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match=r"b\.yaml: no model\.dit section"):
        DiTConfig.from_file(tmp_path / "b.yaml", section=("model", "dit"))
    (tmp_path / "c.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"c\.json: expected a mapping"):
        BigVGANConfig.from_file(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------
# Released configs and presets


def test_released_configs_parse():
    llm = LlmConfig.from_file(FIX / "llm")
    assert llm == configs.tiny()  # the tiny preset is the fixture LLM
    glm = WhisperConfig.from_file(FIX / "audio" / layout.GLM_TOKENIZER_DIR)
    assert glm.is_vq and glm.num_layers_built == 3 and glm.quantize_vocab_size == 48
    whisper = WhisperConfig.from_file(FIX / "audio" / layout.WHISPER_DIR)
    assert not whisper.is_vq and 4 * whisper.d_model == llm.kimia_adaptor_input_dim
    det = DetokenizerConfig.from_released(DETOK_ROOT)
    assert (det.dit.hidden_size, det.dit.depth, det.dit.semantic_vocab_size) == (64, 2, 1024)
    assert det.mel_norm == configs.MelNorm(normalize_mel=True, mel_mean=-4.5, mel_std=2.5)
    assert det.vocoder.hop == 480 and not det.vocoder.use_tanh_at_final
    assert det.with_dtype("bfloat16").dit.dtype == "bfloat16"
    # the DiT section through the generic from_file gives the same config
    yaml_file = DETOK_ROOT / layout.DIT_DIR / layout.DIT_CONFIG
    assert DiTConfig.from_file(yaml_file, section=("model", "dit")) == det.dit


def test_presets():
    assert set(PRESETS) == {"tiny", "0.5b", "7b"}
    b7 = PRESETS["7b"]()
    assert (b7.hidden_size, b7.num_layers_total, b7.head_dim) == (3584, 34, 128)
    assert PRESETS["0.5b"](num_hidden_layers=22).num_layers_total == 24
    glm, whisper = configs.glm4_voice_tokenizer(), configs.whisper_large_v3()
    assert glm.num_layers_built == 16 and glm.quantize_vocab_size == 16384
    assert 4 * whisper.d_model == b7.kimia_adaptor_input_dim
    det = configs.released_detokenizer()
    assert (det.dit.hidden_size, det.dit.depth, det.dit.num_heads) == (2304, 16, 18)
    assert det.dit.semantic_vocab_size == 16384 and det.vocoder.hop == 480
    assert det.mel_norm.mel_std == pytest.approx(3.4584913)


def test_enums():
    assert DType.parse("bfloat16") is DType.BFLOAT16 and DType.parse(jnp.float32) == "float32"
    assert DType.BFLOAT16.itemsize == 2
    with pytest.raises(ValueError, match=r"dtype must be one of .* got 'int8'"):
        DType.parse("int8")
    assert OutputType.parse("both") is OutputType.BOTH and OutputType.TEXT == "text"
    with pytest.raises(ValueError, match="output_type must be one of"):
        OutputType.parse("audio")


def test_layout_names_the_released_folders():
    """The fixtures were written by the official code in the released layout."""
    assert (DETOK_ROOT / layout.DIT_DIR / layout.DIT_CONFIG).is_file()
    assert (DETOK_ROOT / layout.DIT_DIR / layout.TORCH_WEIGHTS).is_file()
    assert (DETOK_ROOT / layout.VOCODER_DIR / layout.VOCODER_CONFIG).is_file()
    for sub in (layout.GLM_TOKENIZER_DIR, layout.WHISPER_DIR):
        assert (FIX / "audio" / sub / layout.CONFIG_JSON).is_file()
        assert (FIX / "audio" / sub / layout.SAFETENSORS).is_file()
    assert (FIX / "audio" / layout.GLM_TOKENIZER_DIR / layout.PREPROCESSOR_CONFIG).is_file()
    assert (FIX / "llm" / "sharded" / layout.SAFETENSORS_INDEX).is_file()

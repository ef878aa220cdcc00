"""kimia_jax.testing: the generated tiny released-layout folder loads through every loader and
converts, and the converted folder loads to the same parameters (exact: same bytes)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from kimia_jax.configs import DetokenizerConfig, LlmConfig, WhisperConfig, layout
from kimia_jax.conversion import detokenizer as detok_conv
from kimia_jax.conversion import llm as llm_conv
from kimia_jax.conversion import whisper as whisper_conv
from kimia_jax.conversion.kimia import convert_all
from kimia_jax.testing import tiny_audio, tiny_kimia, tiny_llm
from kimia_jax.testing.tokenizer import write_tiny_tokenizer
from kimia_jax.text.tokenizer import TextTokenizer

FIX = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_kimia.write(tmp_path_factory.mktemp("tiny") / "Kimi-Audio", dtype="float32")


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "orbax"
    convert_all(tiny, out, dtype="float32", log=lambda _: None)
    return out


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_part_is_in_the_released_layout(tiny):
    names = {p.relative_to(tiny).as_posix() for p in tiny.rglob("*") if p.is_file()}
    assert {
        layout.CONFIG_JSON, layout.SAFETENSORS_INDEX, layout.safetensors_shard(1, 3),
        *layout.TEXT_TOKENIZER_FILES,
        f"{layout.GLM_TOKENIZER_DIR}/{layout.CONFIG_JSON}",
        f"{layout.GLM_TOKENIZER_DIR}/{layout.SAFETENSORS}",
        f"{layout.GLM_TOKENIZER_DIR}/{layout.PREPROCESSOR_CONFIG}",
        f"{layout.WHISPER_DIR}/{layout.CONFIG_JSON}", f"{layout.WHISPER_DIR}/{layout.SAFETENSORS}",
        f"{layout.DIT_DIR}/{layout.DIT_CONFIG}", f"{layout.DIT_DIR}/{layout.TORCH_WEIGHTS}",
        f"{layout.VOCODER_DIR}/{layout.VOCODER_CONFIG}",
        f"{layout.VOCODER_DIR}/{layout.TORCH_WEIGHTS}",
    } <= names  # fmt: skip


def test_generated_parts_have_the_reference_checkpoints_names_and_shapes(tiny):
    """Same tensor names, shapes and configs as the tiny checkpoints the official code wrote."""
    for sub in (layout.WHISPER_DIR, layout.GLM_TOKENIZER_DIR):
        ours = load_file(str(tiny / sub / layout.SAFETENSORS))
        ref = {k: v for k, v in load_file(str(FIX / "audio" / sub / layout.SAFETENSORS)).items()
               if not k.startswith("decoder.") and not k.startswith("ema_")}  # fmt: skip
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
        assert WhisperConfig.from_file(tiny / sub) == WhisperConfig.from_file(FIX / "audio" / sub)
    torch = pytest.importorskip("torch")
    det_ref = FIX / "detokenizer" / "Kimi-Audio-7B-Instruct"
    assert DetokenizerConfig.from_released(tiny) == DetokenizerConfig.from_released(det_ref)
    for sub, entry in ((layout.DIT_DIR, "state_dict"), (layout.VOCODER_DIR, "generator")):
        ours = torch.load(tiny / sub / layout.TORCH_WEIGHTS, weights_only=True)[entry]
        ref = torch.load(det_ref / sub / layout.TORCH_WEIGHTS, weights_only=True)[entry]
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in ref.items()
        }
    assert LlmConfig.from_file(tiny) == LlmConfig.from_file(FIX / "llm")


def test_generation_is_deterministic(tmp_path):
    a = tiny_audio.write_glm_tokenizer(tmp_path / "a", seed=5)
    b = tiny_audio.write_glm_tokenizer(tmp_path / "b", seed=5)
    c = tiny_audio.write_glm_tokenizer(tmp_path / "c", seed=6)
    assert filecmp.cmp(a / layout.SAFETENSORS, b / layout.SAFETENSORS, shallow=False)
    assert not filecmp.cmp(a / layout.SAFETENSORS, c / layout.SAFETENSORS, shallow=False)
    t1, t2 = write_tiny_tokenizer(tmp_path / "t1"), write_tiny_tokenizer(tmp_path / "t2")
    for f in layout.TEXT_TOKENIZER_FILES:
        assert filecmp.cmp(t1 / f, t2 / f, shallow=False)


def test_released_and_converted_load_the_same_params(tiny, converted):
    """Every loader, both layouts; converting keeps every byte (float32)."""
    pairs = [
        (llm_conv.load, tiny, converted),
        (whisper_conv.load, tiny / layout.WHISPER_DIR, converted / layout.WHISPER_DIR),
        (whisper_conv.load, tiny / layout.GLM_TOKENIZER_DIR, converted / layout.GLM_TOKENIZER_DIR),
        (detok_conv.load, tiny, converted),  # the converted root holds detokenizer/
    ]
    for load, released, orbax in pairs:
        cfg_r, p_r = load(released)
        cfg_c, p_c = load(orbax)
        assert cfg_r == cfg_c
        _same(p_r, p_c)
    for f in layout.TEXT_TOKENIZER_FILES:
        assert filecmp.cmp(tiny / f, converted / f, shallow=False)


def test_the_tiny_model_runs(tiny):
    """The generated parts are usable: text round trip, GLM ids in the codebook, finite features
    and a finite waveform."""
    from kimia_jax.audio.tokenizer import GlmTokenizer, WhisperFeatureExtractor
    from kimia_jax.detokenizer import Detokenizer

    tok = TextTokenizer.from_pretrained(tiny)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    wav = (0.3 * np.sin(np.arange(16000) / 7)).astype(np.float32)
    ids = GlmTokenizer.from_pretrained(tiny / layout.GLM_TOKENIZER_DIR).tokenize([wav])[0]
    assert ids.shape == (13,) and ids.min() >= 0 and ids.max() < 48
    feats = WhisperFeatureExtractor.from_pretrained(tiny / layout.WHISPER_DIR).features([wav])[0]
    assert feats.shape == (13, 96) and np.isfinite(feats).all()
    out = Detokenizer.from_pretrained(tiny).detokenize(ids)
    assert out.shape == (13 * 4 * 480,) and np.isfinite(out).all()  # 4 mel frames per token


def test_tiny_llm_matches_its_config(tmp_path):
    d = tiny_llm.write(tmp_path / "llm", dtype="float32", num_shards=2, with_tokenizer=False)
    cfg, params = llm_conv.load(d)
    assert cfg == LlmConfig.from_dict(tiny_llm.TINY_CONFIG)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))

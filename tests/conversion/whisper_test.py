"""Audio encoder conversion: transformers WhisperEncoder parity, sharded/prefixed layouts, Orbax
round trip, and errors naming the tensor (missing / mis-shaped / unused)."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kimia_jax.audio import GlmTokenizer
from kimia_jax.conversion import whisper as conv
from kimia_jax.conversion.common import CheckpointError
from kimia_jax.models.whisper_encoder import WhisperEncoder


def _tiny_hf_whisper(tmp_path, cls_name="WhisperModel", shard=None):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        d_model=32,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        encoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        decoder_layers=1,
        num_mel_bins=128,
        max_source_positions=1500,
        vocab_size=64,
        max_target_positions=32,
        pad_token_id=63,
        bos_token_id=62,
        eos_token_id=62,
        decoder_start_token_id=61,
        begin_suppress_tokens=None,
    )
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms (HF init leaves them at 0 / 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    return model


@pytest.mark.torch
@pytest.mark.parametrize(
    "cls_name,shard", [("WhisperModel", None), ("WhisperForConditionalGeneration", "100KB")]
)
def test_transformers_whisper_encoder_parity(tmp_path, cls_name, shard):
    import torch

    ref = _tiny_hf_whisper(tmp_path, cls_name, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg, params = conv.load(tmp_path)
    mel = np.random.default_rng(0).standard_normal((2, 128, 3000)).astype(np.float32)
    with torch.no_grad():
        encoder = ref.get_encoder()
        want = encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    got = np.asarray(WhisperEncoder(cfg).apply({"params": params}, mel))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, f"encoder rel err {err:.2e} (measured 3.0e-7)"


def _copy(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        t = load_file(dst / "model.safetensors")
        edit(t)
        save_file(t, dst / "model.safetensors")
    return dst


def test_orbax_round_trip_gives_same_tokens(tmp_path, fixtures_dir):
    src = fixtures_dir / "audio" / "glm-4-voice-tokenizer"
    dst = conv.convert_folder(src, tmp_path / "glm_orbax")
    assert json.loads((dst / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    with pytest.raises(FileExistsError):
        conv.convert_folder(src, dst)
    wav = np.random.default_rng(1).standard_normal(30000).astype(np.float32) * 0.1
    a = GlmTokenizer.from_pretrained(src).tokenize([wav])[0]
    b = GlmTokenizer.from_pretrained(dst).tokenize([wav])[0]
    np.testing.assert_array_equal(a, b)
    # GLM-4's full-model layout ("model.encoder." prefix, later layers + final LN) loads too.
    t = {f"model.encoder.{k}": v for k, v in load_file(src / "model.safetensors").items()}
    t["model.encoder.layer_norm.weight"] = np.ones(40, np.float32)
    t["model.encoder.layers.3.fc1.bias"] = np.zeros(80, np.float32)
    full = tmp_path / "full"
    full.mkdir()
    shutil.copy(src / "config.json", full)
    save_file(t, full / "model.safetensors")
    np.testing.assert_array_equal(GlmTokenizer.from_pretrained(full).tokenize([wav])[0], a)


def test_conversion_errors_name_the_tensor(tmp_path, fixtures_dir):
    src = fixtures_dir / "audio" / "glm-4-voice-tokenizer"

    missing = _copy(src, tmp_path / "missing", lambda t: t.pop("layers.1.fc2.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"1 model parameter\(s\) have no tensor in the checkpoint: "
        r"layers_1/fc2/weight",
    ):
        conv.load(missing)

    def misshape(t):
        t["codebook.weight"] = np.zeros((48, 41), np.float32)

    bad = _copy(src, tmp_path / "bad", misshape)
    msg = (
        "tensor 'codebook.weight' has shape (48, 41) (-> (48, 41) as 'codebook'); "
        "the model expects (48, 40)"
    )
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        conv.load(bad)

    def extra(t):
        t["layers.0.self_attn.k_proj.bias"] = np.zeros(40, np.float32)

    unused = _copy(src, tmp_path / "unused", extra)
    with pytest.raises(CheckpointError, match=re.escape("layers.0.self_attn.k_proj.bias")):
        conv.load(unused)

    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(src, no_cfg)
    (no_cfg / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{no_cfg / 'config.json'} is missing")):
        conv.load(no_cfg)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        conv.load(tmp_path / "nowhere")


def test_bad_config_is_named(tmp_path, fixtures_dir):
    src = fixtures_dir / "audio" / "glm-4-voice-tokenizer"
    bad = tmp_path / "bad_cfg"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["pooling_position"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    msg = f"{bad / 'config.json'}: quantize_position 3 < pooling_position 4"
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        conv.load(bad)

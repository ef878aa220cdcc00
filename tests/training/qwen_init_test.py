"""Kimi-Audio checkpoint initialised from a plain Qwen2 HF checkpoint (spec/training.md §3.7).

A tiny Qwen2ForCausalLM is written by transformers; the converted folder is read by the real
loader (`conversion.llm.load`). Measured (fp32, 2-core EPYC): text logits of KimiaLLM on the
text-only pre-training layout vs transformers Qwen2 over the Qwen vocabulary, max abs error
9.9e-7 relative to max |logit| (asserted <= 1e-5); copied tensors bit-identical.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from kimia_jax.conversion import common, qwen_init
from kimia_jax.conversion import llm as conv
from kimia_jax.errors import CheckpointError
from kimia_jax.models.kimia_llm import KimiaLLM

# Tiny Kimi layout: 600 BPE ranks + 80 specials (blank = 623) + 48 audio codes = 728 rows.
OPTS = qwen_init.InitOptions(
    num_base_tokens=600, num_text_specials=80, num_audio_codes=48, kimia_mimo_layers=2,
    adaptor_input_dim=96,
)  # fmt: skip
BLANK = 600 + qwen_init.TEXT_BLANK


def _write_qwen(path, *, vocab=680, tied=False, dtype=torch.float32, seed=0):
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=40, intermediate_size=88, num_hidden_layers=4,
        num_attention_heads=5, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=256, tie_word_embeddings=tied, torch_dtype=dtype,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # every tensor non-trivial (biases and norms too)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_init")
    model = _write_qwen(root / "qwen")
    qwen_init.init_from_qwen(root / "qwen", root / "kimi", OPTS, max_shard_bytes=40_000)
    return model, root / "qwen", root / "kimi"


def test_copied_tensors_bit_identical(converted):
    _, qdir, kdir = converted
    q, k = _tensors(qdir), _tensors(kdir)
    index = json.loads((kdir / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == len(k)
    assert len({f.name for f in kdir.glob("model-*-of-*.safetensors")}) > 1  # sharded
    for name, v in q.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        np.testing.assert_array_equal(k[name], v, err_msg=name)
    np.testing.assert_array_equal(k["model.mimo_norm.weight"], q["model.norm.weight"])
    e, h = k["model.embed_tokens.weight"], k["lm_head.weight"]
    assert e.shape == h.shape == k["mimo_output.weight"].shape == (728, 40)
    rows = np.arange(680) != BLANK
    np.testing.assert_array_equal(e[:680][rows], q["model.embed_tokens.weight"][rows])
    assert not e[BLANK].any()  # the audio-stream filler adds nothing
    np.testing.assert_array_equal(h[:680], q["lm_head.weight"])
    # New rows: mean of the BPE rows + 1 % noise.
    mean = q["model.embed_tokens.weight"][:600].mean(0)
    std = q["model.embed_tokens.weight"][:600].std(0)
    new = e[680:]
    assert np.abs(new - mean).max() < 0.06 * std.max() and np.abs(new - mean).max() > 0
    np.testing.assert_allclose(k["mimo_output.weight"].mean(0), q["lm_head.weight"][:600].mean(0),
                               atol=0.01 * q["lm_head.weight"].std())  # fmt: skip
    # MIMO layers: fresh HF-default init (N(0, 0.02), zero bias, unit norm); adaptor too.
    assert abs(k["model.mimo_layers.0.mlp.up_proj.weight"].std() - 0.02) < 0.003
    assert not k["model.mimo_layers.1.self_attn.q_proj.bias"].any()
    np.testing.assert_array_equal(k["model.mimo_layers.0.input_layernorm.weight"], 1)
    np.testing.assert_array_equal(k["model.vq_adaptor.layers.4.weight"], 1)
    assert k["model.vq_adaptor.layers.0.weight"].shape == (40, 96)


def test_text_only_logits_equal_qwen(converted):
    model, _, kdir = converted
    cfg, params = conv.load(kdir)  # the real loader: every tensor mapped once
    assert cfg.kimia_media_begin == 618 and cfg.kimia_token_offset == 680
    rng = np.random.default_rng(1)
    text = rng.integers(0, 680, size=(2, 12)).astype(np.int32)
    with torch.no_grad():
        want = model(torch.as_tensor(text, dtype=torch.long)).logits.numpy()
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
    llm = KimiaLLM(cfg)
    # Text-only pre-training layout (spec §3.4): blank in the audio stream, text in the text one.
    out = llm.apply({"params": params}, jnp.full_like(text, BLANK), jnp.asarray(text), pos)
    got = np.asarray(out.text_logits)[..., :680]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, err
    # The same ids as the audio stream alone (text stream all zero) run the same forward.
    out2 = llm.apply({"params": params}, jnp.asarray(text), jnp.zeros_like(text), pos)
    err2 = np.abs(np.asarray(out2.text_logits)[..., :680] - want).max() / np.abs(want).max()
    assert err2 <= 1e-5, err2
    assert np.isfinite(np.asarray(out.audio_logits)).all()


def test_tied_bf16_qwen_and_copy_top(tmp_path):
    """A tied, bf16, smaller-vocab Qwen (the 0.5B-3B case): head from the embedding, bits kept."""
    _write_qwen(tmp_path / "q", vocab=650, tied=True, dtype=torch.bfloat16)
    opts = qwen_init.InitOptions(**{**OPTS.__dict__, "mimo_init": "copy_top"})
    cfg = qwen_init.init_from_qwen(tmp_path / "q", tmp_path / "k", opts)
    q, k = _tensors(tmp_path / "q"), _tensors(tmp_path / "k")
    assert "lm_head.weight" not in q and k["lm_head.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(k["lm_head.weight"][:650], q["model.embed_tokens.weight"])
    assert k["lm_head.weight"].shape[0] == cfg.vocab_size == 728
    for part in ("mlp.down_proj.weight", "self_attn.k_proj.bias"):
        src = cfg.kimia_mimo_transformer_from_layer_index + 1
        np.testing.assert_array_equal(
            k[f"model.mimo_layers.1.{part}"], q[f"model.layers.{src + 1}.{part}"]
        )
    _, params = conv.load(tmp_path / "k", dtype="bfloat16")
    flat = common.flatten(params)
    assert flat["embed_tokens/weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(jax.device_get(flat["layers_3/mlp/gate_proj/weight"])),
        q["model.layers.3.mlp.gate_proj.weight"],
    )


def test_clear_errors(tmp_path):
    _write_qwen(tmp_path / "q", vocab=700)
    with pytest.raises(CheckpointError, match="overlap the audio codes"):
        qwen_init.init_from_qwen(tmp_path / "q", tmp_path / "k", OPTS)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        qwen_init.init_from_qwen(tmp_path / "q", tmp_path / "k", OPTS)
    with pytest.raises(CheckpointError, match="not a folder"):
        qwen_init.init_from_qwen(tmp_path / "missing", tmp_path / "k", OPTS)
    assert not (tmp_path / "k").exists()

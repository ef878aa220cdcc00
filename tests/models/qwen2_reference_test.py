"""Second reference for the decoder stack: transformers' Qwen2 with the same weights.

The Kimi checkpoint is built from a tiny random `Qwen2ForCausalLM` (its tensors keep their HF
names) plus random MIMO/adaptor tensors, saved in the released layout and loaded through our
converter. With the text stream all zero the Kimi forward is exactly Qwen2 on the audio stream
(spec/llm.md §3.1 step 3), so the text head must reproduce Qwen2's logits, prefill and decode.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from kimia_jax.conversion import llm as conv
from kimia_jax.models import kimia_llm
from tests.llm_helpers import LLM_DIR, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    kimi_cfg = json.loads((LLM_DIR / "config.json").read_text())
    torch.manual_seed(0)
    qcfg = transformers.Qwen2Config(
        vocab_size=kimi_cfg["vocab_size"], hidden_size=40, intermediate_size=88,
        num_hidden_layers=3,
        num_attention_heads=5, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=8192, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    ref = transformers.Qwen2ForCausalLM(qcfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # non-trivial norms and biases
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    rng = np.random.default_rng(1)
    for name in list(tensors):  # MIMO layers: random tensors of the same shapes
        if name.startswith("model.layers.0.") or name.startswith("model.layers.1."):
            mimo = name.replace("model.layers.", "model.mimo_layers.")
            tensors[mimo] = rng.standard_normal(tensors[name].shape).astype(np.float32) * 0.1
    h, din = 40, kimi_cfg["kimia_adaptor_input_dim"]
    extra = {
        "model.mimo_norm.weight": (h,), "mimo_output.weight": (kimi_cfg["vocab_size"], h),
        "model.vq_adaptor.layers.0.weight": (h, din), "model.vq_adaptor.layers.0.bias": (h,),
        "model.vq_adaptor.layers.3.weight": (h, h), "model.vq_adaptor.layers.3.bias": (h,),
        "model.vq_adaptor.layers.4.weight": (h,), "model.vq_adaptor.layers.4.bias": (h,),
    }  # fmt: skip
    for name, shape in extra.items():
        tensors[name] = rng.standard_normal(shape).astype(np.float32) * 0.1
    d = tmp_path_factory.mktemp("qwen_kimi")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(kimi_cfg))
    cfg, params = conv.load(d)
    return ref, cfg, params


def test_prefill_matches_transformers_qwen2(pair):
    ref, cfg, params = pair
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    pos = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
    out = kimia_llm.KimiaLLM(cfg).apply(
        {"params": params},
        jnp.asarray(ids, jnp.int32),
        jnp.zeros((2, 11), jnp.int32),
        pos,
        collect=True,
    )
    # HF hidden_states: [embeddings, layer0 out, layer1 out, norm(layer2 out)]
    for i in range(cfg.num_hidden_layers - 1):
        err = rel_err(out.aux["main_layer_outputs"][i], want.hidden_states[i + 1].numpy())
        assert err <= 1e-5, f"layer {i}: {err:.2e}"
    assert rel_err(out.aux["norm_out"], want.hidden_states[-1].numpy()) <= 1e-5
    err = rel_err(out.text_logits, want.logits.numpy())
    assert err <= 1e-5, f"logits max rel err {err:.2e}"  # measured 9.9e-7


def test_cached_decode_matches_transformers_qwen2(pair):
    ref, cfg, params = pair
    model = kimia_llm.KimiaLLM(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), use_cache=True)
    past, tok = r.past_key_values, int(r.logits[0, -1].argmax())
    cache = kimia_llm.init_cache(cfg, 1, 16)
    pos = jnp.arange(7, dtype=jnp.int32)[None]
    zeros = jnp.zeros((1, 7), jnp.int32)
    apply = jax.jit(model.apply, static_argnames="attend_cache")
    o = apply({"params": params}, jnp.asarray(ids, jnp.int32), zeros, pos, cache=cache)
    cache = o.cache
    assert int(np.argmax(o.text_logits[0, -1])) == tok
    for step in range(5):
        p = 7 + step
        with torch.no_grad():
            r = ref(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = r.past_key_values
        o = apply(
            {"params": params}, jnp.asarray([[tok]], jnp.int32), jnp.zeros((1, 1), jnp.int32),
            jnp.asarray([[p]], jnp.int32), cache=cache, attend_cache=True,
        )  # fmt: skip
        cache = o.cache
        err = rel_err(o.text_logits[0, 0], r.logits[0, -1].numpy())
        assert err <= 1e-5, f"decode step {step}: {err:.2e}"  # measured <= 6.2e-7
        tok = int(r.logits[0, -1].argmax())
        assert int(np.argmax(o.text_logits[0, 0])) == tok

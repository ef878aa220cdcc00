"""LoRA / QLoRA on KimiaLLM: adapters only train, merge == base + scale B A, the loss goes down.

Measured (fp32, 2-core EPYC, tiny LLM): adapted forward (low-rank path in the layer) vs the forward
of the merged weights, max error ~1e-6 relative to max |logit|; int8 base vs fp32 base at step 0
~1e-2 relative (the quantization itself).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax import configs
from kimia_jax.conversion import common
from kimia_jax.models import kimia_llm
from kimia_jax.training import lora

CFG = configs.tiny()
LCFG = lora.LoraConfig(rank=4, alpha=8.0, select=r"^(layers_[12]|mimo_layers_1)/")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def base():
    return jax.jit(lambda k: kimia_llm.init_params(CFG, k))(jax.random.key(0))


def _batch(seed=0, b=2, t=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(b, t + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    return jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.asarray(pos)


def _perturbed(params, key):
    """Non-zero B so the adapters change the output."""
    flat = common.flatten(params)
    for i, k in enumerate(sorted(flat)):
        if k.endswith("lora_b"):
            flat[k] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), flat[k].shape)
    return common.unflatten(flat)


def test_targets_and_zero_start(base):
    params = lora.add_adapters(base, LCFG, jax.random.key(1))
    paths = lora.target_paths(base, LCFG)
    assert len(paths) == 3 * 7 and all(p.startswith(("layers_1", "layers_2", "mimo_layers_1"))
                                       for p in paths)  # fmt: skip
    a = params["layers_1"]["mlp"]["down_proj"]
    assert a["lora_a"].shape == (4, CFG.intermediate_size)
    assert a["lora_b"].shape == (CFG.hidden_size, 4)
    model = lora.LoraModel(kimia_llm.KimiaLLM(CFG), LCFG)
    x, _, pos = _batch()
    got = jax.jit(model.apply)({"params": params}, x, x, pos).text_logits
    want = jax.jit(kimia_llm.KimiaLLM(CFG).apply)({"params": base}, x, x, pos).text_logits
    assert _rel(got, want) < 1e-6  # B = 0 (two compiled programs: rounding only)
    with pytest.raises(ValueError, match="matches no projection"):
        lora.add_adapters(base, lora.LoraConfig(select="^nothing"), jax.random.key(1))


@pytest.mark.parametrize("t", [10, 300])  # both matmul orientations of matmul_t on CPU
def test_adapted_forward_equals_merged_weights(base, t):
    params = _perturbed(lora.add_adapters(base, LCFG, jax.random.key(1)), jax.random.key(2))
    model = lora.LoraModel(kimia_llm.KimiaLLM(CFG), LCFG)
    x, _, pos = _batch(t=t, b=1)
    got = jax.jit(model.apply)({"params": params}, x, x, pos)
    merged = lora.merge(params, LCFG)
    want = jax.jit(kimia_llm.KimiaLLM(CFG).apply)({"params": merged}, x, x, pos)
    assert _rel(got.text_logits, want.text_logits) < 1e-5
    assert _rel(got.audio_logits, want.audio_logits) < 1e-5
    plain = jax.jit(kimia_llm.KimiaLLM(CFG).apply)({"params": base}, x, x, pos)
    assert _rel(got.audio_logits, plain.audio_logits) > 1e-3  # the adapters do something


def test_merge_is_base_plus_scaled_product(base):
    params = _perturbed(lora.add_adapters(base, LCFG, jax.random.key(1)), jax.random.key(2))
    merged = lora.merge(params, LCFG)
    node = params["mimo_layers_1"]["self_attn"]["k_proj"]
    a, b = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_b"], np.float64)
    want = np.asarray(node["weight"], np.float64) + LCFG.scale * b @ a
    got = merged["mimo_layers_1"]["self_attn"]["k_proj"]
    assert set(got) == {"weight", "bias"}
    np.testing.assert_allclose(np.asarray(got["weight"]), want, rtol=0, atol=1e-6)
    # Everything not adapted is returned bit-identical.
    fm, fb = common.flatten(merged), common.flatten(base)
    assert fm.keys() == fb.keys()
    for k in fb:
        if not (k.rsplit("/", 2)[0].startswith(("layers_1", "layers_2", "mimo_layers_1"))
                and k.endswith("proj/weight")):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(fm[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.slow
def test_scanned_layout_with_remat(base):
    """Stacked layers (nn.scan slices the adapters with the weights) and remat: same logits as the
    unrolled adapted model."""
    cfg = CFG.replace(scan_layers=True, remat_policy="full")
    params = _perturbed(lora.add_adapters(base, LCFG, jax.random.key(1)), jax.random.key(2))
    want = lora.LoraModel(kimia_llm.KimiaLLM(CFG), LCFG)
    x, _, pos = _batch()
    ref = jax.jit(want.apply)({"params": params}, x, x, pos)
    stacked = kimia_llm.stack_layers(lora.quantize(base, "none"), cfg)
    cfg_all = lora.LoraConfig(rank=4, alpha=8.0)  # a stack is one path: all its layers adapted
    sp = _perturbed(lora.add_adapters(stacked, cfg_all, jax.random.key(1)), jax.random.key(2))
    assert sp["layers"]["mlp"]["up_proj"]["lora_a"].shape == (CFG.num_hidden_layers, 4, 40)
    model = lora.LoraModel(kimia_llm.KimiaLLM(cfg), cfg_all)
    got = jax.jit(model.apply)({"params": sp}, x, x, pos)
    merged = jax.jit(kimia_llm.KimiaLLM(cfg).apply)({"params": lora.merge(sp, cfg_all)}, x, x, pos)
    assert _rel(got.text_logits, merged.text_logits) < 1e-5
    assert _rel(got.audio_logits, merged.audio_logits) < 1e-5
    assert _rel(got.text_logits, ref.text_logits) > 1e-4  # different adapters: a real check


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_base(base, kind):
    q = lora.quantize(base, kind)
    w = q["layers_0"]["mlp"]["up_proj"]["weight"]
    assert isinstance(w, lora.QWeight) and w.q.dtype == jnp.dtype(kind)
    deq = np.asarray(w.dequantize(jnp.float32))
    ref = np.asarray(base["layers_0"]["mlp"]["up_proj"]["weight"])
    assert _rel(deq, ref) < (0.01 if kind == "int8" else 0.15)
    params = lora.add_adapters(q, LCFG, jax.random.key(1))
    model = lora.LoraModel(kimia_llm.KimiaLLM(CFG), LCFG)
    x, _, pos = _batch()
    got = jax.jit(model.apply)({"params": params}, x, x, pos).text_logits
    want = jax.jit(kimia_llm.KimiaLLM(CFG).apply)({"params": lora.merge(params, LCFG)}, x, x, pos)
    assert _rel(got, want.text_logits) < 1e-5
    assert lora.merge(params, LCFG)["layers_0"]["mlp"]["up_proj"]["weight"].dtype == jnp.float32


# --- the real train step (train_step.forward_loss: Whisper in the step, two-stream loss) ---


def _fixture_batch():
    from kimia_jax.training import examples as ex_lib
    from tests.training import helpers as h

    # ASR (text loss only) and assistant audio (audio loss: the MIMO adapters get gradients).
    exs = [h.builder().official(h.records()[i], h.TRAIN_FIX) for i in (0, 3)]
    return ex_lib.batch_of(exs, 272, 2, h.PAD, packed=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "int8"])
def test_real_step_trains_only_adapters_and_lowers_loss(kind, tmp_path):
    from kimia_jax.training.optim import OptimConfig
    from kimia_jax.training.train_step import TrainConfig
    from tests.training import helpers as h

    lcfg, wcfg, p = h.params()
    adapted = lora.add_adapters(lora.quantize(p["llm"], kind), LCFG, jax.random.key(1))
    before = jax.tree.map(np.asarray, {"llm": adapted, "whisper": p["whisper"]})
    cfg = TrainConfig(optim=OptimConfig(learning_rate=2e-2, total_steps=10, weight_decay=0.0))
    step = lora.LoraTrainStep(lcfg, wcfg, LCFG, cfg)
    state = step.init({"llm": adapted, "whisper": p["whisper"]})
    assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(
        lora.split(adapted)[0]
    )  # AdamW moments only for adapters
    batch = _fixture_batch()
    losses = []
    for _ in range(6):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    after = jax.tree.map(np.asarray, state.params)
    ad_before, base_before = lora.split(before["llm"])
    frozen_after = common.flatten(after["frozen"]["llm"])
    for k, v in common.flatten(base_before).items():  # frozen: bit-identical
        for x, y in zip(jax.tree.leaves(v), jax.tree.leaves(frozen_after[k]), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=k)
    for x, y in zip(jax.tree.leaves(before["whisper"]), jax.tree.leaves(after["frozen"]["whisper"]),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(x, y)
    fa, fb = common.flatten(after["lora"]), common.flatten(ad_before)
    assert fa.keys() == fb.keys()
    assert all(not np.array_equal(fa[k], fb[k]) for k in fa)  # every adapter moved
    # Merged export = base + scale * B @ A, loadable as plain params.
    merged = step.merged(state)
    node = after["lora"]["layers_2"]["mlp"]["gate_proj"]
    w0 = before["llm"]["layers_2"]["mlp"]["gate_proj"]["weight"]
    w0 = np.asarray(w0.dequantize(jnp.float32)) if kind == "int8" else w0
    want = w0.astype(np.float64) + LCFG.scale * (
        node["lora_b"].astype(np.float64) @ node["lora_a"].astype(np.float64)
    )
    got = np.asarray(merged["layers_2"]["mlp"]["gate_proj"]["weight"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert jax.tree.structure(merged) == jax.tree.structure(p["llm"])
    if kind == "none":  # export to disk, read back by the real loader
        from kimia_jax.conversion import llm as conv

        adapted_now = lora.combine(state.params["lora"], state.params["frozen"]["llm"])
        config_json = (h.LLM_DIR / "config.json").read_text()
        out = lora.export(adapted_now, LCFG, tmp_path / "merged", config_json, dtype=jnp.float32)
        _, loaded = conv.load(out)
        np.testing.assert_array_equal(
            np.asarray(loaded["layers_2"]["mlp"]["gate_proj"]["weight"]), got
        )

"""The train step's attention mask by index (static causal structure + segment ids, what the fused
kernels take) against the mask by positions, the positions contract, and splash vs XLA.

Measured (CPU, fp32, tiny fixture checkpoints, one packed row of 3 examples + padding, T=64):
the index mask gives bit-identical loss and gradients to the positions mask (max relative
difference 0.0: the two boolean masks are equal, so the XLA computation is the same).
Splash attention in Pallas interpret mode (CPU) vs XLA, T=S=128, 4 query / 2 KV heads, 3 segments
+ padding, sharded over (fsdp=2, tensor=2): max difference relative to the largest entry 2.6e-7
forward, 4.0e-7 / 9.0e-8 / 4.5e-7 on the q / k / v gradients (fp32).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax import sharding
from kimia_jax.errors import KimiaError
from kimia_jax.layers import attention as attn
from kimia_jax.layers.attention import AttentionMask, dot_product_attention
from kimia_jax.models import kimia_llm
from kimia_jax.models.kimia_llm import KimiaLLM
from kimia_jax.training import examples as ex_lib
from kimia_jax.training import train_step as ts_lib
from kimia_jax.training.loss import LossConfig
from kimia_jax.training.train_step import TrainConfig, TrainStep, check_positions
from tests.training import helpers as h
from tests.training.examples_test import codes, wav

T, W = 64, 3


def packed_batch() -> dict[str, np.ndarray]:
    b = h.builder()
    exs = [
        b.understanding("asr", wav(5, 1), "ok", instruction="hi", codes=codes(5)),
        b.speech_chat([(wav(4, 2), codes(4), "ok", codes(6, 3))]),
        b.audio_chat([(wav(3, 4), codes(3, 1), "hi")]),
    ]
    batch = ex_lib.batch_of(exs, T, W, h.PAD, packed=True)
    assert batch["segment_ids"].max() == 3 and (batch["segment_ids"] == 0).any()  # + padding
    return batch


def max_rel(a, b) -> float:
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def test_llm_index_mask_equals_positions_mask():
    """KimiaLLM (tiny fixture weights, fp32) on a packed row of three examples + padding: logits
    and parameter gradients with the index-causal mask equal those with the positions-causal mask
    (measured: bit-identical, both masks are the same booleans)."""
    lcfg, _, p = h.params()
    batch = packed_batch()
    check_positions(batch)
    model = KimiaLLM(lcfg)
    wt, wa = jnp.cos(jnp.arange(lcfg.vocab_size)), jnp.sin(jnp.arange(lcfg.vocab_size))

    @functools.partial(jax.jit, static_argnums=1)
    def run(params, by_index):
        def f(params):
            out = model.apply(
                {"params": params}, batch["audio_ids"], batch["text_ids"], batch["positions"],
                segment_ids=batch["segment_ids"], causal_by_index=by_index,
            )  # fmt: skip
            return jnp.sum(out.text_logits * wt) + jnp.sum(out.audio_logits * wa), out

        return jax.value_and_grad(f, has_aux=True)(params)

    (loss_i, out_i), g_i = run(p["llm"], True)
    (loss_p, out_p), g_p = run(p["llm"], False)
    assert max_rel(out_i.text_logits, out_p.text_logits) == 0.0
    assert max_rel(out_i.audio_logits, out_p.audio_logits) == 0.0
    assert max_rel(g_i, g_p) == 0.0
    assert max_rel(g_i, jax.tree.map(jnp.zeros_like, g_i)) > 0  # gradients are not all zero


@pytest.mark.nightly
def test_step_index_mask_equals_positions_mask():
    """The whole train step's loss, per-example losses and gradients (LLM and Whisper) of a packed
    row of three examples: index-causal mask == positions-causal mask (measured: bit-identical)."""
    lcfg, wcfg, p = h.params()
    batch = packed_batch()
    loss_cfg = LossConfig(reduction="segment_mean")

    @functools.partial(jax.jit, static_argnums=1)
    def run(params, by_index):
        return ts_lib.loss_and_grads(
            params, batch, llm_cfg=lcfg, whisper_cfg=wcfg, loss_cfg=loss_cfg,
            whisper_trainable=True, causal_by_index=by_index,
        )  # fmt: skip

    loss_i, m_i, g_i = run(p, True)
    loss_p, m_p, g_p = run(p, False)
    assert np.isfinite(float(loss_i)) and float(loss_i) > 0
    assert max_rel(loss_i, loss_p) == 0.0
    assert max_rel(m_i["segment_loss_text"], m_p["segment_loss_text"]) == 0.0
    assert max_rel(g_i, g_p) == 0.0


def test_positions_contract_error():
    """A batch whose positions do not increase within a segment is refused with a clear error,
    before anything is compiled; the builders' rows (arange per example) pass."""
    batch = packed_batch()
    check_positions(batch)
    check_positions({"positions": np.arange(8)[None]})  # no segment ids: one segment
    bad = dict(batch)
    bad["positions"] = batch["positions"].copy()
    bad["positions"][0, 3] = 0  # segment 1 restarts inside itself
    with pytest.raises(KimiaError, match=r"row 0 .*index 3.*strictly increase"):
        check_positions(bad)
    with pytest.raises(KimiaError, match="strictly increase"):
        check_positions({"positions": np.array([[0, 1, 1, 2]])})
    # Accumulation batches [A, B, T] are checked too.
    with pytest.raises(KimiaError, match="strictly increase"):
        check_positions(
            {"positions": bad["positions"][None], "segment_ids": batch["segment_ids"][None]}
        )
    lcfg, wcfg, p = h.params()
    step = TrainStep(lcfg, wcfg, TrainConfig(packed=True))
    with pytest.raises(KimiaError, match="strictly increase"):
        step.loss_and_grads(p, bad)


def _splash_interpret(monkeypatch):
    real = attn._make_splash_kernel  # noqa: SLF001
    monkeypatch.setattr(attn, "_make_splash_kernel", functools.partial(real, interpret=True))


def test_splash_interpret_matches_xla(monkeypatch):
    """Splash attention (Pallas interpret mode on CPU) with the training mask (index-causal +
    3 segments + padding segment 0) equals the XLA path, forward and q/k/v gradients,
    per shard under a (fsdp=2, tensor=2) mesh (rows and heads split by shard_map)."""
    _splash_interpret(monkeypatch)
    b, t, n, kh, hd = 2, 128, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, n, hd), jnp.float32)
    k = jax.random.normal(kk, (b, t, kh, hd), jnp.float32)
    v = jax.random.normal(kv, (b, t, kh, hd), jnp.float32)
    seg = np.zeros((b, t), np.int32)
    seg[0, :50], seg[0, 50:90], seg[0, 90:120] = 1, 2, 3  # row 0: 3 segments + padding
    seg[1, :] = 1
    seg = jnp.asarray(seg)
    w = jnp.cos(jnp.arange(hd))

    def loss(impl, q, k, v):
        mask = AttentionMask.make_causal() & AttentionMask.make_segments(seg)
        out = dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return jnp.sum(out * w), out

    def run(impl):
        fn = jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2), has_aux=True)
        return jax.jit(fn)(q, k, v)

    (_, out_x), g_x = run("xla")
    with sharding.mesh_context(sharding.make_mesh(fsdp=2, tensor=2)):
        (_, out_s), g_s = run("pallas")
    got, want = (out_s, *g_s), (out_x, *g_x)
    err = [max_rel(a, c) for a, c in zip(got, want, strict=True)]
    print("splash (interpret, sharded) vs xla, relative max |diff| out, dq, dk, dv:", err)
    assert max(err) < 1e-5


def test_training_llm_lowers_to_splash_for_tpu():
    """With `attention_implementation="pallas"` the training-row attention of KimiaLLM (index mask
    + segment ids, scanned, remat) lowers for TPU to the splash Pallas kernel (forward and
    backward custom calls), sharded per shard under an fsdp mesh; the positions mask cannot use
    the kernel and stays on XLA. Lowering only (no TPU needed)."""
    from jax import export

    cfg = h.params()[0].replace(
        attention_implementation="pallas", scan_layers=True, remat_policy="full"
    )
    params = nn.unbox(kimia_llm.abstract_params(cfg))
    ids = jax.ShapeDtypeStruct((4, 128), jnp.int32)

    def grads(by_index, params, a, t, pos, seg):
        def loss(params):
            out = KimiaLLM(cfg).apply(
                {"params": params}, a, t, pos, segment_ids=seg, causal_by_index=by_index
            )
            return jnp.sum(out.text_logits)

        return jax.grad(loss)(params)

    def kernels(by_index):
        fn = jax.jit(functools.partial(grads, by_index))
        exp = export.export(fn, platforms=("tpu",))(params, ids, ids, ids, ids)
        return exp.mlir_module().count("tpu_custom_call")

    with sharding.mesh_context(sharding.make_mesh(fsdp=4)):
        assert kernels(True) >= 4  # splash forward + backward in both layer stacks
        assert kernels(False) == 0

"""The compiled train step on the tiny fixture checkpoints: Whisper phases, 8 simulated devices,
gradient accumulation, bf16, and a three-clip conversation training.

All tests share one batch shape ([4, 64], 3 Whisper windows per row) so the single-device steps
compile once per phase. Measured (CPU, fp32): 8 devices (data=2, fsdp=2, tensor=2) vs one device
over 5 steps (lr 1e-3, Adam eps 1e-6, Whisper trained): losses 2.3e-7 relative, updated params
1.5e-6 relative to each tensor's largest entry (see the note at CFG for eps 1e-8).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax import sharding
from kimia_jax.conversion import common
from kimia_jax.training import examples as ex_lib
from kimia_jax.training import optim
from kimia_jax.training.loss import LossConfig
from kimia_jax.training.optim import OptimConfig
from kimia_jax.training.train_step import TrainConfig, TrainStep, supports_segments
from tests.training import helpers as h
from tests.training.examples_test import codes, speech_reply, user_audio, wav

T, W, ROWS = 64, 3, 4
# Adam eps 1e-6 (default 1e-8): an element whose gradient is at the reduction-order noise level
# (~1e-9 here) moves by lr * g / (|g| + eps), which amplifies that noise by lr / eps; with eps 1e-8
# the 8-device run differed from the single device by up to 4.7e-5 (relative to a tensor's largest
# entry, layers_1 up_proj) although the losses agreed to 2.3e-7.
CFG = TrainConfig(optim=OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, eps=1e-6))


def three_clip_conversation() -> ex_lib.Example:
    """Two user audios in one turn, an assistant text, a third user audio, a spoken answer."""
    msgs = [
        user_audio(4, 1, 0),
        user_audio(5, 2, 1),
        {"role": "assistant", "message_type": "text", "content": "ok"},
        user_audio(3, 3, 2),
        speech_reply("hi", 8, 4),
    ]
    return h.builder().conversation(msgs, "both", task="s2s")


@functools.cache
def batch() -> dict[str, np.ndarray]:
    b = h.builder()
    exs = [
        b.understanding("asr", wav(20, 1), "hello world", instruction="hi", codes=codes(20)),
        b.speech_chat([(wav(6, 2), codes(6), "ok", codes(12, 3))]),
        three_clip_conversation(),
        b.tts("hi", codes(10, 5)),
    ]
    assert [len(e.spans) for e in exs] == [1, 1, 3, 0]
    return ex_lib.batch_of(exs, T, W, h.PAD, packed=False, rows=ROWS)


@functools.cache
def single() -> TrainStep:
    lcfg, wcfg, _ = h.params()
    return TrainStep(lcfg, wcfg, CFG)


def fresh_params():
    return jax.tree.map(jnp.array, h.params()[2])  # copies: steps donate their state


def max_rel(a, b) -> float:
    errs = jax.tree.map(
        lambda x, y: (
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30)
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(errs))


@functools.cache
def single_run() -> tuple[list[float], dict, list[float]]:
    """Frozen phase 2 steps, then unfrozen 3 steps, on one device: (losses, params, whisper
    diffs)."""
    ts = single()
    state = ts.init(fresh_params(), whisper_trainable=False)
    w0 = jax.device_get(state.params["whisper"])
    losses = []
    for _ in range(2):
        state, m = ts(state, batch())
        losses.append(float(m["loss"]))
    frozen = jax.device_get(state.params["whisper"])
    state = ts.unfreeze_whisper(state)
    for _ in range(3):
        state, m = ts(state, batch())
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), [w0, frozen, jax.device_get(state.opt_state)]


@pytest.mark.slow
def test_frozen_whisper_is_bit_identical_then_trains_with_fresh_moments():
    losses, params, (w0, frozen, opt_state) = single_run()
    # frozen phase: not one bit of the encoder moved (no update, no decoupled weight decay)
    jax.tree.map(np.testing.assert_array_equal, frozen, w0)
    # unfrozen phase: the encoder trains; its AdamW count started at the unfreeze (fresh moments)
    assert max_rel(params["whisper"], w0) > 0
    groups = optim.group_states(opt_state)
    counts = {
        k: int(np.asarray(leaf))
        for k in ("llm", "whisper")
        for leaf in jax.tree.leaves(groups[k])
        if np.ndim(leaf) == 0 and np.issubdtype(np.asarray(leaf).dtype, np.integer)
    }
    assert counts == {"llm": 5, "whisper": 3}
    assert losses[-1] < losses[0]
    assert all(np.isfinite(losses))


def test_frozen_phase_optimizer_applies_no_decay_to_the_encoder():
    """Decay would move the encoder even with zero gradients: the frozen group is set_to_zero."""
    p = fresh_params()
    tx = optim.make_optimizer(
        OptimConfig(learning_rate=1e-3, warmup_steps=0), whisper_trainable=False
    )
    state = tx.init(p)
    zero = jax.tree.map(jnp.zeros_like, p)
    ones = jax.tree.map(jnp.ones_like, p)
    upd, _ = tx.update({"llm": zero["llm"], "whisper": ones["whisper"]}, state, p)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(upd["whisper"]))
    # the LLM group decays its matrices but not its norms and biases
    flat = common.flatten(upd["llm"])
    assert float(jnp.abs(flat["embed_tokens/weight"]).max()) > 0
    assert float(jnp.abs(flat["norm/weight"]).max()) == 0
    assert float(jnp.abs(flat["layers_0/self_attn/q_proj/bias"]).max()) == 0
    assert float(jnp.abs(flat["vq_adaptor/layers_4/weight"]).max()) == 0


@pytest.mark.slow
def test_eight_devices_match_one_device_over_five_steps():
    losses, params, _ = single_run()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    lcfg, wcfg, _ = h.params()
    ts = TrainStep(lcfg, wcfg, CFG, mesh)
    state = ts.init(fresh_params(), whisper_trainable=False)
    emb = state.params["llm"]["embed_tokens"]["weight"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    got = []
    for i in range(5):
        if i == 2:
            state = ts.unfreeze_whisper(state)
        state, m = ts(state, batch())
        got.append(float(m["loss"]))
    np.testing.assert_allclose(got, losses, rtol=1e-5)
    assert max_rel(jax.device_get(state.params), params) <= 1e-5


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch():
    ts = single()
    p = h.params()[2]
    whole = batch()
    split = {k: v.reshape(2, ROWS // 2, *v.shape[1:]) for k, v in whole.items()}
    loss_a, m_a, g_a = ts.loss_and_grads(p, whole)
    loss_b, m_b, g_b = ts.loss_and_grads(p, split)
    assert abs(float(loss_a) - float(loss_b)) <= 1e-5 * abs(float(loss_a))
    for k in ("loss_text", "loss_audio"):
        assert abs(float(m_a[k]) - float(m_b[k])) <= 1e-5 * abs(float(m_a[k]))
    assert max_rel(g_b, g_a) <= 1e-5


@pytest.mark.slow
def test_bf16_compute_with_fp32_master_weights():
    lcfg, wcfg, _ = h.params()
    ts = TrainStep(lcfg, wcfg, TrainConfig(optim=CFG.optim, compute_dtype="bfloat16"))
    p = fresh_params()
    loss16, _, g16 = ts.loss_and_grads(p, batch())
    loss32, _, g32 = single().loss_and_grads(p, batch())
    assert jax.tree.leaves(g16)[0].dtype == jnp.float32  # gradients of the fp32 master weights
    assert abs(float(loss16) - float(loss32)) <= 2e-2 * float(loss32)
    state = ts.init(p, whisper_trainable=True)
    state, m = ts(state, batch())
    assert state.params["llm"]["lm_head"]["weight"].dtype == jnp.float32
    assert np.isfinite(float(m["loss"]))


@pytest.mark.slow
def test_packed_row_equals_examples_alone():
    """A row packing three examples (segment ids 1-3, positions restarting, 3 windows) gives each
    example's own loss, and 3 x its gradient (segment_mean) is the sum of the three alone."""
    b = h.builder()
    exs = [
        b.understanding("asr", wav(5, 1), "ok", instruction="hi", codes=codes(5)),
        b.speech_chat([(wav(4, 2), codes(4), "ok", codes(6, 3))]),
        b.audio_chat([(wav(3, 4), codes(3, 1), "hi")]),
    ]
    assert supports_segments()
    lcfg, wcfg, p = h.params()
    cfg = TrainConfig(optim=CFG.optim, packed=True, loss=LossConfig(reduction="segment_mean"))
    ts = TrainStep(lcfg, wcfg, cfg)
    packed = ex_lib.batch_of(exs, T, W, h.PAD, packed=True)
    assert packed["segment_ids"].shape == (1, T) and packed["segment_ids"].max() == 3
    loss_p, m_p, g_p = ts.loss_and_grads(p, packed)
    alone_losses, g_sum = [], None
    for e in exs:
        loss_a, _, g_a = ts.loss_and_grads(p, ex_lib.batch_of([e], T, W, h.PAD, packed=True))
        alone_losses.append(float(loss_a))
        g_sum = g_a if g_sum is None else jax.tree.map(jnp.add, g_sum, g_a)
    per = np.asarray(m_p["segment_loss_text"] + m_p["segment_loss_audio"])[0, 1:4]
    np.testing.assert_allclose(per, alone_losses, rtol=1e-5)
    np.testing.assert_allclose(float(loss_p), np.mean(alone_losses), rtol=1e-5)
    assert max_rel(jax.tree.map(lambda g: 3 * g, g_p), g_sum) <= 1e-5

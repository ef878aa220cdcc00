"""`TrainConfig.scan_layers` / `remat_policy` (and `--config.model.*` of the experiment configs):
a train step with scanned layer stacks and per-layer remat equals the unrolled step without
remat, from the same (unrolled) checkpoint params.

Measured (CPU, fp32, tiny fixture model, text-only rows, scan + dots_saveable vs unrolled without
remat): loss 0 difference, gradients 2.9e-6 relative to each tensor's largest entry; after two
AdamW steps (lr 1e-3, eps 1e-6) losses 0 difference, params 2.2e-6 (eps 1e-3: 1.0e-7). Before the
decay mask ignored the stack axis, the stacked norm scales and biases were decayed: the second
loss differed by 1.5e-5 and the params by 2.0e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.models import kimia_llm
from kimia_jax.training import optim
from kimia_jax.training.optim import OptimConfig
from kimia_jax.training.train_step import TrainConfig, TrainStep
from tests.training import helpers as h
from tests.training.text_only_test import batches
from tests.training.train_step_test import max_rel

OPT = OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, eps=1e-6)


@functools.cache
def steps() -> tuple[TrainStep, TrainStep]:
    lcfg, wcfg, _ = h.params()
    plain = TrainStep(lcfg, wcfg, TrainConfig(optim=OPT))
    scan = TrainStep(
        lcfg, wcfg, TrainConfig(optim=OPT, scan_layers=True, remat_policy="dots_saveable")
    )
    return plain, scan


def unrolled(tree, step: TrainStep):
    """LLM subtree back in the unrolled layout."""
    cfg = step.llm_cfg.replace(scan_layers=False)
    return {**tree, "llm": kimia_llm.to_layout(tree["llm"], cfg)}


def test_config_reaches_the_llm():
    plain, scan = steps()
    assert (plain.llm_cfg.scan_layers, plain.llm_cfg.remat_policy) == (False, "none")
    assert (scan.llm_cfg.scan_layers, scan.llm_cfg.remat_policy) == (True, "dots_saveable")
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        TrainConfig(remat_policy="sometimes")


def test_weight_decay_mask_is_layout_independent():
    """Stacked norm scales / biases are 2-D but still get no decay (the stack axis is not a
    parameter dimension)."""
    plain, scan = steps()
    p = h.params()[2]["llm"]
    stacked = optim.decay_mask(kimia_llm.to_layout(p, scan.llm_cfg))
    plain_mask = optim.decay_mask(p)
    for name in kimia_llm.STACK_NAMES:
        assert stacked[name] == plain_mask[f"{name}_0"]
    assert not stacked["layers"]["input_layernorm"]["weight"]
    assert stacked["layers"]["self_attn"]["q_proj"]["weight"]
    assert not stacked["layers"]["self_attn"]["q_proj"]["bias"]


def test_scan_remat_gradients_equal_unrolled():
    plain, scan = steps()
    p = h.params()[2]
    none, _ = batches()
    loss_a, _, g_a = plain.loss_and_grads(p, none, whisper_trainable=False)
    loss_b, _, g_b = scan.loss_and_grads(p, none, whisper_trainable=False)
    assert "layers" in g_b["llm"]  # really the stacked layout
    assert abs(float(loss_a) - float(loss_b)) <= 1e-6 * float(loss_a)
    assert max_rel(unrolled(g_b, scan)["llm"], g_a["llm"]) <= 1e-5


@pytest.mark.slow
def test_scan_remat_train_steps_equal_unrolled():
    plain, scan = steps()
    none, _ = batches()
    out = []
    for step in (plain, scan):
        state = step.init(jax.tree.map(jnp.array, h.params()[2]), whisper_trainable=False)
        losses = []
        for _ in range(2):
            state, m = step(state, none)
            losses.append(float(m["loss"]))
        out.append((losses, unrolled(jax.device_get(state.params), step)))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-6)
    assert max_rel(out[1][1], out[0][1]) <= 1e-5


def test_experiment_config_overrides_reach_train_config():
    from experiments import train
    from experiments.configs import tiny_demo

    c = tiny_demo.get_config()
    assert (train.train_config(c).scan_layers, train.train_config(c).remat_policy) == (
        False,
        "none",
    )
    c.model.scan_layers = True  # what --config.model.scan_layers=True sets
    c.model.remat_policy = "dots_saveable"
    c.model.whisper_remat_policy = "none"
    tc = train.train_config(c)
    assert (tc.scan_layers, tc.remat_policy, tc.whisper_remat_policy) == (
        True,
        "dots_saveable",
        "none",
    )

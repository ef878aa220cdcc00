"""Whisper encoder per-layer remat (`WhisperConfig.remat_policy`, set by
`TrainConfig.whisper_remat_policy` for the trained phase): same parameter paths, same output,
same gradients as without remat, and the backward really recomputes (fewer saved residuals).

Measured (CPU, fp32, random 3-layer d_model 32 encoder over 200 mel frames): loss 0 difference,
gradients 3.4e-7 relative to each tensor's largest entry ("full" and "dots_saveable" vs "none").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.models.whisper_encoder import WhisperConfig, WhisperEncoder, init_params
from tests.training.helpers import rel_err


@functools.cache
def loaded():
    cfg = WhisperConfig(
        d_model=32,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        encoder_layers=3,
        max_source_positions=100,
        attention_chunk=None,
    )
    params = init_params(cfg)
    mel = jax.random.normal(jax.random.key(0), (2, cfg.num_mel_bins, 200), jnp.float32)
    return cfg, params, mel


def loss_fn(cfg):
    def loss(p, mel):
        h = WhisperEncoder(cfg).apply({"params": p}, mel)
        return jnp.sum(jnp.sin(h))  # a non-trivial cotangent for every output element

    return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gradients_equal_no_remat(policy):
    cfg, params, mel = loaded()
    assert cfg.remat_policy == "none"
    rcfg = dataclasses.replace(cfg, remat_policy=policy)
    l0, g0 = loss_fn(cfg)(params, mel)
    l1, g1 = loss_fn(rcfg)(params, mel)
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    errs = jax.tree.map(rel_err, g1, g0)
    assert max(jax.tree.leaves(errs)) <= 1e-6, errs


def test_remat_recomputes_in_the_backward():
    """With "full" the forward saves only each layer's input for the backward: the residuals
    of the linearized function shrink (the memory effect, measured on 0.5B + whisper-large-v3
    shapes with tools/plan_memory.py, README)."""
    cfg, params, mel = loaded()

    def saved_bytes(c):
        f = lambda p: WhisperEncoder(c).apply({"params": p}, mel)  # noqa: E731
        _, vjp = jax.vjp(f, params)
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(vjp))

    full = saved_bytes(dataclasses.replace(cfg, remat_policy="full"))
    none = saved_bytes(cfg)
    assert full < none / 2, (full, none)


def test_bad_policy_is_a_clear_error():
    cfg, params, mel = loaded()
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        WhisperEncoder(dataclasses.replace(cfg, remat_policy="sometimes")).apply(
            {"params": params}, mel
        )

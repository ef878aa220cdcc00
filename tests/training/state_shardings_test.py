"""Optimizer-state shardings under a mesh (8 simulated devices): one code path
(`train_step.like_params`) for `TrainStep`, `LoraTrainStep` and `tools/plan_memory`, on optax
`multi_transform` / `masked` states (their `MaskedNode` placeholders) in both Whisper phases and
both layer layouts. Abstract params only: nothing is allocated but the tiny plan_memory lowering.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import optax
import pytest
from jax.sharding import NamedSharding

from kimia_jax import configs, sharding
from kimia_jax.models import kimia_llm
from kimia_jax.models import whisper_encoder as wenc
from kimia_jax.training import lora as lora_lib
from kimia_jax.training import optim
from kimia_jax.training import train_step as ts

REPO = Path(__file__).parents[2]


def _is_sh(x) -> bool:
    return isinstance(x, NamedSharding)


@functools.cache
def mesh():
    return sharding.make_mesh(data=2, fsdp=2, tensor=2)


def models(scan: bool = False):
    lcfg = configs.tiny(param_dtype="float32", scan_layers=scan)
    d = lcfg.kimia_adaptor_input_dim // 4
    wcfg = wenc.WhisperConfig(
        d_model=d, encoder_attention_heads=4, encoder_ffn_dim=2 * d, encoder_layers=2
    )
    params = {
        "llm": nn.unbox(kimia_llm.abstract_params(lcfg)),
        "whisper": nn.unbox(wenc.abstract_params(wcfg)),
    }
    return lcfg, wcfg, params


def check_like_params(opt_state, opt_sh, params, param_sh, rep):
    """Every moment leaf is placed like its parameter; everything else is replicated; the tree
    (MaskedNode placeholders included) is the state's."""
    assert jax.tree.structure(opt_sh, is_leaf=_is_sh) == jax.tree.structure(opt_state)
    by_path = {
        ts._dict_keys(p): (leaf.shape, sh)
        for (p, leaf), sh in zip(
            jax.tree_util.tree_leaves_with_path(params),
            jax.tree.leaves(param_sh, is_leaf=_is_sh),
            strict=True,
        )
    }
    n_moments = 0
    flat_sh = jax.tree.leaves(opt_sh, is_leaf=_is_sh)
    leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    for (path, leaf), sh in zip(leaves, flat_sh, strict=True):
        keys = ts._dict_keys(path)
        hits = [by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path]
        if hits and hits[0][0] == leaf.shape:
            assert sh == hits[0][1], path
            n_moments += 1
        else:
            assert leaf.ndim == 0 and sh == rep, path
    return n_moments


@pytest.mark.parametrize(("scan", "whisper_trainable"), [(False, True), (True, False)])
def test_train_step_state_shardings_cover_multi_transform_states(scan, whisper_trainable):
    lcfg, wcfg, params = models(scan)
    step = ts.TrainStep(lcfg, wcfg, ts.TrainConfig(), mesh())
    state = step.abstract_state(params, whisper_trainable=whisper_trainable)
    sh = step.state_shardings(state)
    rep = sharding.replicated(mesh())
    n = check_like_params(state.opt_state, sh.opt_state, params, sh.params, rep)
    n_llm = len(jax.tree.leaves(params["llm"]))
    n_whisper = len(jax.tree.leaves(params["whisper"]))
    # AdamW mu + nu of every LLM param; of the encoder's only when it trains (else set_to_zero)
    assert n == 2 * n_llm + (2 * n_whisper if whisper_trainable else 0)
    # some moments are really sharded (not everything replicated)
    emb = sh.params["llm"]["embed_tokens"]["weight"]
    assert emb.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    groups = optim.group_states(sh.opt_state)
    mu = groups["llm"].inner_state[0].mu  # MaskedState(ScaleByAdamState, ...)
    assert mu["llm"]["embed_tokens"]["weight"] == emb
    masked = jax.tree.leaves(mu["whisper"], is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    assert masked and all(isinstance(x, optax.MaskedNode) for x in masked)


def test_params_in_the_other_layer_layout_are_a_clear_error():
    lcfg, wcfg, _ = models(scan=True)
    _, _, unrolled = models(scan=False)
    step = ts.TrainStep(lcfg, wcfg, ts.TrainConfig(), mesh())
    state = step.abstract_state(unrolled, whisper_trainable=False)
    with pytest.raises(ValueError, match="to_layout"):
        step.state_shardings(state)


def test_lora_state_shardings_use_the_same_path():
    lcfg, wcfg, params = models()
    lc = lora_lib.LoraConfig(rank=4, alpha=8.0)
    params["llm"] = jax.eval_shape(
        lambda p: lora_lib.add_adapters(p, lc, jax.random.key(0)), params["llm"]
    )
    step = lora_lib.LoraTrainStep(lcfg, wcfg, lc, ts.TrainConfig(), mesh())
    state = jax.eval_shape(step.init_fn(), params)
    sh = step.state_shardings(params)
    rep = sharding.replicated(mesh())
    n = check_like_params(
        state.opt_state, sh.opt_state, state.params["lora"], sh.params["lora"], rep
    )
    assert n == 2 * len(jax.tree.leaves(state.params["lora"]))


PLAN_CODE = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from tests.training import state_shardings_test as t
from tools import plan_memory
r = plan_memory.plan("cpu:8", "data=2,fsdp=2,tensor=2", 4, 32, 1, model="tiny",
                     whisper_trainable=True, lower_only=True)
lcfg, wcfg, params = t.models()
step = t.ts.TrainStep(lcfg, wcfg, t.ts.TrainConfig(compute_dtype="bfloat16"), t.mesh())
want = step.state_shardings(step.abstract_state(params, whisper_trainable=True))
got = [x.sharding.spec for x in jax.tree.leaves(r["state"].opt_state)]
assert got == [s.spec for s in jax.tree.leaves(want.opt_state, is_leaf=t._is_sh)]
print("same shardings", len(got))
"""


def test_plan_memory_lowers_with_the_train_step_shardings():
    """In a subprocess: tools modules define absl flags that clash with experiments' flags."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-c", PLAN_CODE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "same shardings" in r.stdout

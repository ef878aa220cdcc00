"""Sharded == unsharded on 8 simulated CPU devices (mesh data=2, fsdp=2, tensor=2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from kimia_jax import sharding
from kimia_jax.conversion import llm as conv
from kimia_jax.inference import generate as gen
from kimia_jax.models import kimia_llm
from tests.llm_helpers import LLM_DIR, TINY_STREAM, fixture_prompt, rel_err


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    return sharding.parse_mesh("data=2,fsdp=2,tensor=2")


def test_parse_mesh_and_errors():
    m = sharding.parse_mesh("data=2,tensor=2")
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.parse_mesh(None).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        sharding.parse_mesh("data=4,fsdp=2,tensor=2")
    with pytest.raises(ValueError, match="bad --mesh entry"):
        sharding.parse_mesh("model=2")


def test_rules_replicate_what_does_not_divide(mesh):
    # 40 hidden / fsdp 2 divides; 1 KV head (8 = 1 x 8 rows) over tensor 2 divides rows only.
    assert sharding.spec_for(("vocab", "embed"), (728, 40), mesh) == PartitionSpec("tensor", "fsdp")
    assert sharding.spec_for(("vocab", "embed"), (727, 41), mesh) == PartitionSpec(None, None)
    assert sharding.spec_for(("batch", "length"), (4, 9), mesh) == PartitionSpec(
        ("data", "fsdp"), None
    )
    with pytest.raises(KeyError, match="no rule"):
        sharding.spec_for(("nonsense",), (4,), mesh)


def test_non_dividing_dimension_is_logged_once_or_raises_when_strict(mesh, caplog):
    caplog.set_level("WARNING")
    for _ in range(3):
        spec = sharding.spec_for(("vocab", "embed"), (727, 40), mesh, name="lm_head/weight")
        assert spec == PartitionSpec(None, "fsdp")
    msgs = [r.getMessage() for r in caplog.records if "lm_head/weight" in r.getMessage()]
    assert msgs == [
        "lm_head/weight: dimension 'vocab' of size 727 is not divisible by mesh axes ('tensor',) "
        "(size 2); it is replicated"
    ]
    with pytest.raises(sharding.ShardingError, match="'vocab' of size 727 .*; strict sharding"):
        sharding.spec_for(("vocab", "embed"), (727, 40), mesh, name="lm_head/weight", strict=True)
    previous = sharding.set_strict(True)
    try:
        with pytest.raises(sharding.ShardingError, match=r"\('batch', 'length'\)\(3, 9\)"):
            sharding.spec_for(("batch", "length"), (3, 9), mesh)
    finally:
        sharding.set_strict(previous)


def test_jitted_function_is_retraced_for_each_context_mesh():
    """The mesh is part of the trace: one jitted function, called with the same arguments under
    two meshes and under none, follows each (the old private mesh stack reused the first trace,
    constraints for the first mesh included)."""
    f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length")))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    big = sharding.parse_mesh("data=2,fsdp=2,tensor=2")
    small = sharding.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[4:])
    outs = {}
    for name, m in [("big", big), ("none", None), ("small", small), ("big2", big)]:
        with sharding.mesh_context(m):
            outs[name] = f(x)
        np.testing.assert_array_equal(outs[name], 2 * x)
    assert outs["big"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert len(outs["big"].sharding.device_set) == 8
    assert len(outs["none"].sharding.device_set) == 1
    assert outs["small"].sharding.device_set == set(jax.devices()[4:])
    assert outs["big2"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert sharding.current_mesh() is None  # nothing left behind


def test_every_param_carries_logical_names():
    cfg = conv.LlmConfig.from_file(LLM_DIR)
    boxed = kimia_llm.abstract_params(cfg)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, sharding.nn.Partitioned))
    assert leaves and all(isinstance(x, sharding.nn.Partitioned) for x in leaves)


@pytest.fixture(scope="module")
def runs(mesh):
    """The same prefill + 16-step greedy decode, unsharded and sharded (params loaded onto
    shards).
    """
    cfg, params = conv.load(LLM_DIR)
    _, sharded_params = conv.load(LLM_DIR, mesh=mesh)
    p = fixture_prompt(cfg.kimia_adaptor_input_dim)
    # batch of 4 rows so the batch axis really splits over data x fsdp
    p4 = jax.tree.map(lambda x: None if x is None else jnp.concatenate([x] * 4), p)
    p4 = p4.replace(lengths=jnp.asarray([37, 30, 20, 37], jnp.int32))
    model = kimia_llm.KimiaLLM(cfg)
    kw = dict(model=model, max_new_tokens=16, stream=TINY_STREAM["both"], trace=True)
    single = gen.generate_fixed(params, p4, jax.random.key(0), **kw)
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    p4s = jax.tree.map(lambda x: None if x is None else jax.device_put(x, batch_sh), p4)
    with sharding.mesh_context(mesh):
        multi = gen.generate_fixed(sharded_params, p4s, jax.random.key(0), **kw)
    return sharded_params, single, multi


def test_params_are_really_sharded(runs):
    sharded_params, _, _ = runs
    emb = sharded_params["embed_tokens"]["weight"]
    assert emb.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert len({s.device for s in emb.addressable_shards}) == 8
    assert emb.addressable_shards[0].data.shape == (364, 20)


def test_sharded_decode_equals_single_device(runs):
    _, single, multi = runs
    for stream in ("text_logits", "audio_logits"):
        err = rel_err(multi.trace[stream], single.trace[stream])
        # measured 3.7e-7 (text) / 3.2e-7 (audio): reduction order only
        assert err <= 1e-5, f"{stream}: sharded vs single max rel err {err:.2e}"
    np.testing.assert_array_equal(multi.state.text_history, single.state.text_history)
    np.testing.assert_array_equal(multi.state.audio_history, single.state.audio_history)
    np.testing.assert_array_equal(multi.num_steps, single.num_steps)

"""Scanned layer stack (`scan_layers`) == unrolled, from the same checkpoint: prefill logits,
decode through `generate` with the cache, and gradients with remat on; layout conversion.

Measured 2026-11-27 (fp32, CPU): prefill logits, layer outputs and cache bit-identical; decode
logits 2.5e-7 (text) / 2.2e-7 (audio) relative apart, 2.5e-7 / 4.8e-7 from the PyTorch fixture;
gradients with remat 2.0e-6 (scan, "full" and "save_qkv_proj") and 1.4e-6 (unrolled + remat)
from the unrolled gradient without remat.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.conversion import llm as conv
from kimia_jax.inference import generate as gen
from kimia_jax.models import kimia_llm
from tests.llm_helpers import LLM_DIR, TINY_STREAM, fixture, fixture_prompt, rel_err


@pytest.fixture(scope="module")
def loaded():
    cfg, params = conv.load(LLM_DIR)
    scfg = dataclasses.replace(cfg, scan_layers=True)
    return cfg, params, scfg, kimia_llm.to_layout(params, scfg)


def test_layouts_convert_both_ways_exactly(loaded):
    cfg, params, scfg, sparams = loaded
    n, m = cfg.num_hidden_layers, cfg.kimia_mimo_layers
    assert "layers" in sparams and "layers_0" not in sparams and "mimo_layers_0" not in sparams
    q = sparams["layers"]["self_attn"]["q_proj"]["weight"]
    assert q.shape == (n, *params["layers_0"]["self_attn"]["q_proj"]["weight"].shape)
    assert sparams["mimo_layers"]["mlp"]["up_proj"]["weight"].shape[0] == m
    # the stacked tree is exactly what the scanned model initializes (paths, shapes, dtypes)
    want = nn.unbox(kimia_llm.abstract_params(scfg))
    assert jax.tree.structure(sparams) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(sparams), jax.tree.leaves(want), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    back = kimia_llm.to_layout(sparams, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert kimia_llm.to_layout(params, cfg) is params  # already in the asked layout
    # the stacked layer axis carries the logical name "layers"
    boxed = kimia_llm.abstract_params(scfg)["layers"]["mlp"]["gate_proj"]["weight"]
    assert boxed.names == ("layers", "mlp", "embed")


def _prefill(cfg, params):
    p = fixture_prompt(cfg.kimia_adaptor_input_dim)
    pos = jnp.arange(p.audio_ids.shape[1], dtype=jnp.int32)[None]
    return jax.jit(
        lambda prm: kimia_llm.KimiaLLM(cfg).apply(
            {"params": prm}, p.audio_ids, p.text_ids, pos, p.features, p.is_continuous,
            collect=True,
        )
    )(params)  # fmt: skip


def test_scanned_prefill_equals_unrolled_and_fixture(loaded):
    cfg, params, scfg, sparams = loaded
    a, b = _prefill(cfg, params), _prefill(scfg, sparams)
    d = fixture()
    for name in ("text_logits", "audio_logits"):
        # measured 0 (bit-identical) scan vs unrolled; vs the PyTorch fixture 3.9e-7 / 3.7e-7
        assert rel_err(getattr(b, name), getattr(a, name)) <= 1e-6
        assert rel_err(getattr(b, name), d[f"prefill_{name}"]) <= 1e-5
    for name in ("main_layer_outputs", "mimo_layer_outputs"):
        assert rel_err(b.aux[name], a.aux[name]) <= 1e-6
    for x, y in ((b.cache.k, a.cache.k), (b.cache.v, a.cache.v)):
        assert rel_err(x, y) <= 1e-6
    np.testing.assert_array_equal(b.cache.length, a.cache.length)


def test_scanned_decode_through_generate_equals_unrolled(loaded):
    cfg, params, scfg, sparams = loaded
    p = fixture_prompt(cfg.kimia_adaptor_input_dim)
    outs = [
        gen.generate_fixed(
            prm,
            p,
            jax.random.key(0),
            model=kimia_llm.KimiaLLM(c),
            max_new_tokens=12,
            stream=TINY_STREAM["both"],
            trace=True,
        )  # fmt: skip
        for c, prm in ((cfg, params), (scfg, sparams))
    ]
    d = fixture()
    for stream in ("text", "audio"):
        got, want = outs[1].trace[f"{stream}_logits"], outs[0].trace[f"{stream}_logits"]
        assert rel_err(got, want) <= 1e-6  # measured 2.5e-7 / 2.2e-7 (scan vs unrolled)
        assert rel_err(got[:, 0], d[f"decode_both_{stream}_logits"]) <= 1e-5
    np.testing.assert_array_equal(outs[1].state.text_history, outs[0].state.text_history)
    np.testing.assert_array_equal(outs[1].state.audio_history, outs[0].state.audio_history)


@pytest.mark.parametrize("policy", ["full", "save_qkv_proj"])
def test_gradients_with_remat_equal_unrolled(loaded, policy):
    """d(loss)/d(params) of a next-token loss: scan + remat vs unrolled without remat."""
    cfg, params, scfg, sparams = loaded
    p = fixture_prompt(cfg.kimia_adaptor_input_dim)
    pos = jnp.arange(p.audio_ids.shape[1], dtype=jnp.int32)[None]
    target = jnp.roll(p.text_ids, -1, axis=1)

    def loss(prm, c):
        o = kimia_llm.KimiaLLM(c).apply(
            {"params": prm}, p.audio_ids, p.text_ids, pos, p.features, p.is_continuous
        )
        lt = jax.nn.log_softmax(o.text_logits) + jax.nn.log_softmax(o.audio_logits)
        return -jnp.mean(jnp.take_along_axis(lt, target[..., None], axis=-1))

    g_ref = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    rcfg = dataclasses.replace(scfg, remat_policy=policy)
    g_scan = kimia_llm.to_layout(jax.jit(jax.grad(loss), static_argnums=1)(sparams, rcfg), cfg)
    ucfg = dataclasses.replace(cfg, remat_policy=policy)
    g_unrolled = jax.jit(jax.grad(loss), static_argnums=1)(params, ucfg)
    for g in (g_scan, g_unrolled):
        for path, a in jax.tree_util.tree_leaves_with_path(g):
            b = g_ref
            for k in path:
                b = b[k.key]
            # measured <= 2.0e-6 relative (summation order only)
            assert rel_err(a, b) <= 1e-5, f"{policy} {jax.tree_util.keystr(path)}"


def test_bad_remat_policy_is_a_clear_error(loaded):
    cfg, params, _, _ = loaded
    bad = dataclasses.replace(cfg, remat_policy="sometimes")
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        kimia_llm.abstract_params(bad)

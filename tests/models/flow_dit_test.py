"""FlowDiT parity against the official fixtures: single calls, the ODE schedule, KV-cache carry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.detokenizer import euler_schedule, plan_chunks, torch_linspace_f32
from kimia_jax.layers.kv_cache import KVCache


@pytest.fixture(scope="module")
def dit_apply(detok):
    return jax.jit(lambda p, *a: detok.dit.apply({"params": p}, *a, return_hidden=True))


_LP, _SP = 168, 480  # one padded shape for every call: one compile, and it exercises the key mask


def _call(detok, dit_apply, x, cond, t, pos, cache):
    """One DiT forward over an explicit K/V cache [depth, 1, S, N, H], padded to fixed shapes."""
    ck, cv = cache
    n, s = x.shape[0], ck.shape[2]
    pad = ((0, 0), (0, 0), (0, _SP - s), (0, 0), (0, 0))
    ckp, cvp = jnp.pad(ck, pad), jnp.pad(cv, pad)
    xp = np.zeros((1, _LP, x.shape[1]), np.float32)
    xp[0, :n] = x
    condp = np.zeros((1, _LP), np.int32)
    condp[0, :n] = cond
    posp = np.arange(_LP, dtype=np.int32)[None] + int(pos[0])
    np.testing.assert_array_equal(posp[0, :n], pos)
    kv = KVCache(k=ckp, v=cvp, length=jnp.asarray([s], jnp.int32))
    frames = (np.arange(_LP) < n)[None]
    out, k, v, hid = dit_apply(
        detok.params["dit"], xp, condp, jnp.asarray([t], jnp.int32), posp, kv, frames
    )
    hid = {kk: np.asarray(vv[0, :n] if vv.ndim == 3 else vv[0]) for kk, vv in hid.items()}
    return np.asarray(out[0, :n]), (k[:, :, :n], v[:, :, :n]), hid


def test_schedule_matches_official_integer_timesteps(cases):
    t, t_int, dt = euler_schedule(30)
    for c in cases.values():
        for i in range(int(c["num_chunks"])):
            np.testing.assert_array_equal(t, c[f"chunk{i}_ode_t_float"])  # bit-exact float32
            np.testing.assert_array_equal(t_int, c[f"chunk{i}_ode_t_long"])
            if f"chunk{i}_refill_t_long" in c:
                assert (
                    int(np.float32(0.999) * np.float32(1000))
                    == int(c[f"chunk{i}_refill_t_long"])
                    == 999
                )
    assert len(dt) == 29 and float(t[0] + dt.astype(np.float64).sum()) == pytest.approx(
        1.0, abs=1e-6
    )
    # spec §3.2: torch.linspace rounds once; numpy.linspace is one ulp off at i = 3, 6, 12.
    span = torch_linspace_f32(0.0, 1.0, 30)
    assert span[-1] == np.float32(1.0)


def test_chunk_plan_and_offsets_match_official(cases):
    for c in cases.values():
        n = c["semantic_tokens"].shape[1]
        plan = plan_chunks(n)
        assert len(plan) == int(c["num_chunks"])
        np.testing.assert_array_equal([f for _, _, f in plan], c["chunk_is_final"])


def test_single_dit_calls_and_kv_cache_carry(detok, dit_apply, cases):
    """step0 / refill / last-step DiT calls, with the cache rebuilt from the recorded refill inputs.

    Measured (fp32, 2-core CPU): max abs <= 5e-6 on outputs of magnitude ~6.
    """
    cfg = detok.dit_cfg
    worst = 0.0
    for name, c in cases.items():
        empty = jnp.zeros((cfg.depth, 1, 0, cfg.num_heads, cfg.head_dim))
        cache = (empty, empty)
        for i in range(int(c["num_chunks"])):
            p = f"chunk{i}_"
            assert cache[0].shape[2] == int(c[p + "ode_prev_kv_len"])
            out, kv, hid = _call(
                detok,
                dit_apply,
                c[p + "noise"],
                c[p + "step0_condition"],
                0,
                c[p + "step0_position_ids"],
                cache,
            )
            err = np.abs(out - c[p + "step0_out"]).max()
            assert err <= 1e-4, f"case {name} chunk {i} step0: max abs {err:.2e}"
            worst = max(worst, err)
            np.testing.assert_allclose(hid["t_emb"], c[p + "step0_t_emb"], atol=1e-5)
            for key in ("input_linear", "block0_out", "block1_out"):
                if p + "step0_" + key in c:
                    e = np.abs(hid[key] - c[p + "step0_" + key]).max()
                    assert e <= 1e-4, f"case {name} chunk {i} {key}: max abs {e:.2e}"
            if p + "steplast_x" in c:
                t_last = int(c[p + "ode_t_long"][-1])
                out, _, _ = _call(
                    detok,
                    dit_apply,
                    c[p + "steplast_x"],
                    c[p + "step0_condition"],
                    t_last,
                    c[p + "step0_position_ids"],
                    cache,
                )
                err = np.abs(out - c[p + "steplast_out"]).max()
                assert err <= 1e-4, (
                    f"case {name} chunk {i} last step (t={t_last}): max abs {err:.2e}"
                )
            if p + "refill_out" in c:
                n_keep = len(c[p + "refill_condition"])
                assert int(c[p + "refill_prev_kv_len"]) == cache[0].shape[2]
                out, kv, _ = _call(
                    detok,
                    dit_apply,
                    c[p + "ode_final"][:n_keep],
                    c[p + "refill_condition"],
                    999,
                    c[p + "refill_position_ids"],
                    cache,
                )
                err = np.abs(out - c[p + "refill_out"]).max()
                assert err <= 1e-4, f"case {name} chunk {i} refill: max abs {err:.2e}"
                cache = tuple(
                    jnp.concatenate([a, b], axis=2) for a, b in zip(cache, kv, strict=True)
                )
    assert worst < 1e-4


def test_ode_and_mel_after_streamed_chunks(runs, cases):
    """Whole jitted chunk (29 Euler steps in a fori_loop, padded bucket, cache commit) vs official.

    Measured: ode_final max abs <= 5.0e-6, mel_full <= 1.3e-5 (rel L2 2.4e-7; bound 1e-4); with
    the fixed 900-frame cache buffer before capacity buckets: 4.6e-6, 1.2e-5 (2.5e-7).
    """
    for name, c in cases.items():
        traces = runs[name]["traces"]
        assert len(traces) == int(c["num_chunks"])
        for i, tr in enumerate(traces):
            p = f"chunk{i}_"
            np.testing.assert_array_equal(tr["tokens_upsampled"], c[p + "tokens_upsampled"])
            assert tr["start_position_id"] == int(c[p + "start_position_id"])
            assert tr["look_ahead_frames"] == int(c[p + "look_ahead_frames"])
            assert tr["ode_prev_kv_len"] == int(c[p + "ode_prev_kv_len"])
            assert len(tr["mel"]) == int(c[p + "mel_len"])
            err = np.abs(tr["ode_final"] - c[p + "ode_final"]).max()
            assert err <= 1e-4, f"case {name} chunk {i} ode_final: max abs {err:.2e}"
        mel = np.concatenate([tr["mel"] for tr in traces])
        err = np.abs(mel - c["mel_full"]).max()
        rel = np.linalg.norm(mel - c["mel_full"]) / np.linalg.norm(c["mel_full"])
        assert err <= 1e-4 and rel <= 1e-4, (
            f"case {name} mel_full: max abs {err:.2e}, rel L2 {rel:.2e}"
        )

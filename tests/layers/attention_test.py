"""The shared attention function: hand-computed answers for every mask kind, GQA grouping, CPU
query chunking, segment ids, and the backend dispatch (cuDNN by argument capture, splash attention
in Pallas interpret mode on CPU).

Measured (fp32, CPU): hand-computed cases match to 1e-6 absolute; chunked vs one-block, grouped vs
repeated K/V, packed segments vs each segment alone: <= 1e-6; splash interpret vs XLA: <= 2e-6.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.layers import attention as attn
from kimia_jax.layers.attention import AttentionMask
from kimia_jax.layers.attention import dot_product_attention as _dpa

ATOL = 1e-6
# jitted once per shape: eager op-by-op dispatch is what made these tests slow
dot_product_attention = jax.jit(_dpa, static_argnames=("scale", "implementation", "q_chunk"))


def _zeros_q(t: int, n: int = 1, h: int = 1) -> jax.Array:
    """Zero queries: every visible key gets the same score, so the output is the mean of the
    visible values."""
    return jnp.zeros((1, t, n, h), jnp.float32)


def _values(vals: list[float]) -> jax.Array:  # [1, S, 1, 1]
    return jnp.asarray(vals, jnp.float32)[None, :, None, None]


def test_softmax_by_hand():
    # scores [0, ln 3] -> probabilities [1/4, 3/4]; out = 1/4 v0 + 3/4 v1
    q = jnp.asarray([1.0, 0.0])[None, None, None]  # [1, 1, 1, 2]
    k = jnp.asarray([[0.0, 0.0], [math.log(3.0), 0.0]])[None, :, None]  # [1, 2, 1, 2]
    v = jnp.asarray([[4.0, 0.0], [0.0, 8.0]])[None, :, None]
    out = dot_product_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 6.0], atol=ATOL)
    # default scale 1/sqrt(H): scores [0, ln 3 / sqrt 2]
    p1 = 3 ** (1 / math.sqrt(2)) / (1 + 3 ** (1 / math.sqrt(2)))
    out = dot_product_attention(q, k, v)
    np.testing.assert_allclose(out[0, 0, 0], [4 * (1 - p1), 8 * p1], atol=ATOL)


def test_causal_by_positions():
    v = _values([1.0, 2.0, 6.0, 100.0])
    pos = jnp.arange(3)[None]
    out = dot_product_attention(
        _zeros_q(3), v[:, :3], v[:, :3], mask=AttentionMask.make_causal(pos, pos)
    )
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 1.5, 3.0], atol=ATOL)
    # decode over a cache: query at position 2, cache of 4 slots (slot 3 not written yet)
    mask = AttentionMask.make_causal(jnp.asarray([[2]]), jnp.arange(4)[None])
    out = dot_product_attention(_zeros_q(1), v, v, mask=mask)
    np.testing.assert_allclose(out[0, 0, 0, 0], 3.0, atol=ATOL)
    # no positions: bottom-right aligned, the 2 queries are at positions 2 and 3 of 4 keys
    out = dot_product_attention(_zeros_q(2), v, v, mask=AttentionMask.make_causal())
    np.testing.assert_allclose(out[0, :, 0, 0], [3.0, 27.25], atol=ATOL)


def test_block_causal():
    want = np.array(
        [
            [1, 1, 0, 0],  # block {0, 1}: query 0 also sees key 1
            [1, 1, 0, 0],
            [1, 1, 1, 1],  # block {2, 3}
            [1, 1, 1, 1],
        ],
        bool,
    )
    mask = AttentionMask.make_block_causal(2)
    np.testing.assert_array_equal(mask.dense(4, 4)[0], want)
    v = _values([1.0, 3.0, 5.0, 7.0])
    out = dot_product_attention(_zeros_q(4), v, v, mask=mask)
    np.testing.assert_allclose(out[0, :, 0, 0], [2.0, 2.0, 4.0, 4.0], atol=ATOL)
    # with key padding (the GLM-4 VQ encoder): key 3 is padding
    both = mask & AttentionMask.make_padding(jnp.asarray([[1, 1, 1, 0]]))
    want[:, 3] = False
    np.testing.assert_array_equal(both.dense(4, 4)[0], want)
    out = dot_product_attention(_zeros_q(4), v, v, mask=both)
    np.testing.assert_allclose(out[0, :, 0, 0], [2.0, 2.0, 3.0, 3.0], atol=ATOL)


def test_padding_valid_and_lengths():
    v = jnp.concatenate([_values([1.0, 3.0, 8.0]), _values([2.0, 4.0, 9.0])])  # B = 2
    q = jnp.zeros((2, 1, 1, 1))
    by_valid = AttentionMask.make_padding(jnp.asarray([[1, 1, 0], [1, 0, 0]]))
    by_len = AttentionMask.make_padding(kv_lengths=jnp.asarray([2, 1]))
    for mask in (by_valid, by_len):
        out = dot_product_attention(q, v, v, mask=mask)
        np.testing.assert_allclose(out[:, 0, 0, 0], [2.0, 2.0], atol=ATOL)
    with pytest.raises(ValueError, match="exactly one"):
        AttentionMask.make_padding()


def test_segments_by_hand():
    v = _values([1.0, 3.0, 10.0, 20.0])
    mask = AttentionMask.make_segments(jnp.asarray([[0, 0, 1, 1]]))
    out = dot_product_attention(_zeros_q(4), v, v, mask=mask)
    np.testing.assert_allclose(out[0, :, 0, 0], [2.0, 2.0, 15.0, 15.0], atol=ATOL)
    # packed causal rows: causal within each segment
    pos = jnp.asarray([[0, 1, 0, 1]])
    packed = mask & AttentionMask.make_causal(pos, pos)
    out = dot_product_attention(_zeros_q(4), v, v, mask=packed)
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 2.0, 10.0, 15.0], atol=ATOL)


def test_fully_masked_row_averages():
    v = _values([1.0, 3.0])
    out = dot_product_attention(
        _zeros_q(1), v, v, mask=AttentionMask.make_padding(jnp.zeros((1, 2)))
    )
    np.testing.assert_allclose(out[0, 0, 0, 0], 2.0, atol=ATOL)


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _masks(b: int, t: int, s: int) -> dict[str, AttentionMask | None]:
    rng = np.random.default_rng(7)
    valid = jnp.asarray(rng.uniform(size=(b, s)) < 0.8).at[:, 0].set(True)
    k_seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, s)), axis=1))
    pos = jnp.broadcast_to(jnp.arange(t)[None] + (s - t), (b, t))  # bottom-right aligned
    k_pos = jnp.arange(s)[None]
    return {
        "none": None,
        "causal": AttentionMask.make_causal(),
        "causal_positions": AttentionMask.make_causal(pos, k_pos),
        "block_causal_padding": AttentionMask.make_block_causal(5)
        & AttentionMask.make_padding(valid),
        "lengths": AttentionMask.make_padding(kv_lengths=jnp.asarray([s, s - 7][:b])),
        "segments_causal": AttentionMask.make_segments(k_seg[:, s - t :], k_seg)
        & AttentionMask.make_causal(pos, k_pos),
    }


@pytest.mark.parametrize(
    "kind",
    ["none", "causal", "causal_positions", "block_causal_padding", "lengths", "segments_causal"],
)
def test_gqa_grouping_equals_repeated_kv(kind):
    b, t, n, kh, h = 2, 13, 6, 2, 8
    q, k, v = _rand((b, t, n, h), 0), _rand((b, t, kh, h), 1), _rand((b, t, kh, h), 2)
    mask = _masks(b, t, t)[kind]
    got = dot_product_attention(q, k, v, mask=mask)
    rep = lambda a: jnp.repeat(a, n // kh, axis=2)  # noqa: E731  (head i uses KV head i // G)
    want = dot_product_attention(q, rep(k), rep(v), mask=mask)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # and the plain per-head formula
    allowed = (
        jnp.ones((b, t, t), bool) if mask is None else jnp.broadcast_to(mask.dense(t, t), (b, t, t))
    )
    s = jnp.einsum("btnh,bsnh->bnts", q, rep(k)) / math.sqrt(h)
    p = jax.nn.softmax(jnp.where(allowed[:, None], s, -jnp.inf), axis=-1)
    np.testing.assert_allclose(got, jnp.einsum("bnts,bsnh->btnh", p, rep(v)), atol=ATOL)


@pytest.mark.parametrize(
    "kind",
    ["none", "causal", "causal_positions", "block_causal_padding", "lengths", "segments_causal"],
)
@pytest.mark.parametrize("ts", [(37, 37), (11, 37)])
def test_chunked_equals_one_block(kind, ts):
    t, s = ts
    b, n, kh, h = 2, 4, 2, 8
    q, k, v = _rand((b, t, n, h), 3), _rand((b, s, kh, h), 4), _rand((b, s, kh, h), 5)
    mask = _masks(b, t, s)[kind]
    want = dot_product_attention(q, k, v, mask=mask)
    got = dot_product_attention(q, k, v, mask=mask, q_chunk=8)
    assert jax.default_backend() == "cpu"  # the chunked loop runs on CPU only
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_segments_equal_each_segment_alone():
    b, n, kh, h = 1, 4, 2, 8
    lens = [5, 9, 3]
    t = sum(lens)
    q, k, v = _rand((b, t, n, h), 6), _rand((b, t, kh, h), 7), _rand((b, t, kh, h), 8)
    seg = jnp.asarray(np.repeat(np.arange(3), lens))[None]
    pos = jnp.asarray(np.concatenate([np.arange(n_) for n_ in lens]))[None]
    for causal in (False, True):
        mask = AttentionMask.make_segments(seg)
        if causal:
            mask = mask & AttentionMask.make_causal(pos, pos)
        got = dot_product_attention(q, k, v, mask=mask)
        start = 0
        for n_ in lens:
            sl = slice(start, start + n_)
            alone = AttentionMask.make_causal() if causal else None
            want = dot_product_attention(q[:, sl], k[:, sl], v[:, sl], mask=alone)
            np.testing.assert_allclose(got[:, sl], want, atol=ATOL)
            start += n_


def test_mask_errors():
    with pytest.raises(ValueError, match="two causal"):
        AttentionMask.make_causal() & AttentionMask.make_block_causal(4)
    with pytest.raises(ValueError, match="k_positions"):
        AttentionMask.make_causal(jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="multiple of 3 KV heads"):
        dot_product_attention(
            jnp.zeros((1, 2, 4, 8)), jnp.zeros((1, 2, 3, 8)), jnp.zeros((1, 2, 3, 8))
        )
    with pytest.raises(ValueError, match="implementation 'flash'"):
        dot_product_attention(
            jnp.zeros((1, 2, 2, 8)),
            jnp.zeros((1, 2, 2, 8)),
            jnp.zeros((1, 2, 2, 8)),
            implementation="flash",
        )


# ------------------------------------------------------------------------------------------------
# backend dispatch


def test_auto_implementation(monkeypatch):
    q16 = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    q32 = q16.astype(jnp.float32)
    traced = AttentionMask.make_causal(jnp.zeros((1, 128), jnp.int32), jnp.arange(128)[None])
    assert attn._auto_implementation(q32, q32, None) == "xla"  # the test host is a CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attn._auto_implementation(q16, q16, None) == "cudnn"
    assert attn._auto_implementation(q32, q32, None) == "xla"  # cuDNN has no fp32 kernel
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attn._auto_implementation(q32, q32, AttentionMask.make_causal()) == "pallas"
    assert attn._auto_implementation(q32, q32, traced) == "xla"  # dynamic positions
    assert attn._auto_implementation(q32[:, :100], q32, None) == "xla"  # not 128-aligned
    with pytest.raises(ValueError, match="bf16/fp16"):
        dot_product_attention(q32, q32, q32, implementation="cudnn")
    with pytest.raises(ValueError, match="traced positions"):
        dot_product_attention(q32, q32, q32, mask=traced, implementation="pallas")


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("none", set()),
        ("causal", {"is_causal"}),
        ("lengths", {"key_value_seq_lengths"}),
        ("block_causal_padding", {"mask"}),
        ("causal_positions", {"mask"}),
    ],
)
def test_cudnn_arguments(monkeypatch, kind, expect):
    """The cuDNN path's arguments, checked by running them through jax's own XLA implementation."""
    calls = []
    real = jax.nn.dot_product_attention

    def fake(q, k, v, **kw):
        calls.append(kw)
        assert kw.pop("implementation") == "cudnn"
        return real(q, k, v, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(attn, "_cudnn_reason", lambda q, k, mask: None)  # allow fp32 here
    b, t, n, kh, h = 2, 16, 4, 2, 8
    q, k, v = _rand((b, t, n, h), 9), _rand((b, t, kh, h), 10), _rand((b, t, kh, h), 11)
    mask = _masks(b, t, t)[kind]
    got = dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    (kw,) = calls
    assert set(kw) - {"scale"} == expect
    assert kw.get("is_causal", True) is True
    assert kw["scale"] == pytest.approx(1 / math.sqrt(h))
    np.testing.assert_allclose(got, dot_product_attention(q, k, v, mask=mask), atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "causal", "block_causal_padding", "segments"])
def test_splash_interpret_equals_xla(monkeypatch, kind):
    """The TPU path (mask mapping, GQA via the MQA kernel, segment ids) in Pallas interpret mode."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    def interpret_kernel(mask, heads):
        return sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * heads), interpret=True)

    monkeypatch.setattr(attn, "_make_splash_kernel", interpret_kernel)
    b, t, n, kh, h = 1, 256, 2, 1, 128
    q, k, v = _rand((b, t, n, h), 12), _rand((b, t, kh, h), 13), _rand((b, t, kh, h), 14)
    mask = {
        "none": None,
        "causal": AttentionMask.make_causal(),
        "block_causal_padding": AttentionMask.make_block_causal(128)
        & AttentionMask.make_padding(kv_lengths=jnp.asarray([200])),
        "segments": AttentionMask.make_segments(jnp.asarray([[0] * 100 + [1] * 156])),
    }[kind]
    got = dot_product_attention(q, k, v, mask=mask, implementation="pallas")
    np.testing.assert_allclose(got, dot_product_attention(q, k, v, mask=mask), atol=2e-6)

"""K/V cache capacity buckets: a long stream that grows through the ladder and slides at 900 frames
gives the same chunks as one fixed 900-frame buffer (the layout before buckets)."""

import copy
import dataclasses

import numpy as np
import pytest

from kimia_jax.detokenizer import Detokenizer, StreamingConfig, plan_chunks

# 30 | 8 x 30 | 5 tokens: commits 72, 192, ..., 792, then 912 and 1032 frames, trimmed to 900.
N_TOKENS = 275


def _run(det: Detokenizer, tokens: np.ndarray, noise: list[np.ndarray]):
    """Streams `tokens` chunk by chunk; returns per-chunk traces and the cache after each chunk."""
    # Mel is what the cache changes; the vocoder and stitching are covered by streaming_test.
    det = copy.copy(det)
    det.vocode = lambda m: np.zeros(len(m) * 480, np.float32)
    state = det.new_state()
    traces, caches = [], []
    sc = det.streaming
    for s, e, fin in plan_chunks(len(tokens), sc.first_chunk_size, sc.chunk_size):
        tr = {}
        _, state = det.detokenize_chunk(state, tokens[s:e], is_final=fin, noise=noise, trace=tr)
        traces.append(tr)
        n = tr["cache_len_after"]
        caches.append(np.asarray(state.cache_k)[:, :, :n] if not fin else None)
    return traces, caches


@pytest.fixture(scope="module")
def long_runs(detok):
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, detok.dit_cfg.semantic_vocab_size, N_TOKENS)
    noise, carry = [], 0
    for s, e, fin in plan_chunks(N_TOKENS):
        noise.append(rng.standard_normal((carry + 4 * (e - s), 80)).astype(np.float32))
        carry = 0 if fin else 48
    fixed = Detokenizer(
        detok.dit_cfg,
        detok.vocoder_cfg,
        detok.params,
        detok.mel_norm,
        streaming=dataclasses.replace(detok.streaming, kv_cache_buckets=()),
    )
    return _run(detok, tokens, noise), _run(fixed, tokens, noise)


def test_capacity_ladder():
    sc = StreamingConfig()
    assert sc.cache_capacities() == (0, 128, 256, 512, 900)
    assert [sc.cache_capacity(n) for n in (0, 1, 72, 128, 129, 432, 552, 900)] == [
        0, 128, 128, 128, 256, 512, 900, 900,
    ]  # fmt: skip
    assert StreamingConfig(kv_cache_buckets=()).cache_capacities() == (900,)
    small = StreamingConfig(max_kv_cache_tokens=200, kv_cache_buckets=(0, 128, 256, 512))
    assert small.cache_capacities() == (0, 128, 200)  # never beyond max_kv_cache_tokens
    with pytest.raises(ValueError, match="max_kv_cache_tokens"):
        small.cache_capacity(201)
    with pytest.raises(ValueError, match="bad streaming config"):
        StreamingConfig(kv_cache_buckets=(-1, 128))


def test_growing_cache_matches_fixed_900_buffer(long_runs):
    """Same positions, cache lengths and (to float32 rounding) mel as the fixed buffer.

    Not bit-identical: XLA's softmax/attention reductions group terms by the key count, so even a
    first chunk with an empty cache (0 vs 900 masked keys) differs by an ulp, which 29 Euler steps
    carry to ~1e-7 relative. Measured (tiny, fp32, 2-core CPU), worst chunk of 10: ode_final rel L2
    1.6e-7 (max abs 2.6e-6 on values up to 7.8), mel rel L2 1.6e-7 (max abs 6.2e-6 on values up to
    24), committed keys max abs 3.6e-6 on values up to 6.5; no growth across chunks or the trim.
    """
    (tr_b, ck_b), (tr_f, ck_f) = long_runs
    assert [t["cache_capacity"] for t in tr_b] == [0, 128, 256, 512, 512, 900, 900, 900, 900, 900]
    assert {t["cache_capacity"] for t in tr_f} == {900}
    lens = [t["cache_len_after"] for t in tr_b]
    assert lens == [72, 192, 312, 432, 552, 672, 792, 900, 900, 900]  # trimmed from 912, 1032
    assert lens == [t["cache_len_after"] for t in tr_f]

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for i, (b, f) in enumerate(zip(tr_b, tr_f, strict=True)):
        assert b["start_position_id"] == f["start_position_id"]
        for key in ("ode_final", "mel"):
            r, e = rel(b[key], f[key]), np.abs(b[key] - f[key]).max()
            assert r <= 1e-6 and e <= 2e-5, f"chunk {i} {key}: rel L2 {r:.1e}, max abs {e:.1e}"
        if ck_b[i] is not None:
            e = np.abs(ck_b[i] - ck_f[i]).max() / np.abs(ck_f[i]).max()
            assert e <= 1e-6, f"chunk {i}: committed keys differ by {e:.1e} (relative to max)"


def test_compiled_functions_are_reused_by_the_next_utterance(detok, long_runs):
    """A second identical stream compiles nothing new and repeats the first bit for bit."""
    (tr_b, _), _ = long_runs
    sizes = detok._chunk_fn._cache_size(), detok._chunk_fn_grow._cache_size()
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, detok.dit_cfg.semantic_vocab_size, N_TOKENS)
    noise = [t["noise"] for t in tr_b]
    traces, _ = _run(detok, tokens, noise)
    assert (detok._chunk_fn._cache_size(), detok._chunk_fn_grow._cache_size()) == sizes
    for a, b in zip(traces, tr_b, strict=True):
        np.testing.assert_array_equal(a["mel"], b["mel"])


def test_warmup_compiles_every_shape_a_stream_reaches(detok):
    """chunk_shapes/warmup cover every stream: all final lengths, growth, trim, position resets.

    A small chunking config (same model) keeps it quick: 3-token first chunk, 2-token chunks,
    1 token of look-ahead, a 20-frame cache with rungs 0, 8, 16, and a position reset every ~6
    chunks.
    """
    sc = StreamingConfig(
        first_chunk_size=3,
        chunk_size=2,
        look_ahead_tokens=1,
        max_kv_cache_tokens=20,
        kv_cache_buckets=(0, 8, 16),
        max_pos_size=60,
    )
    det = Detokenizer(detok.dit_cfg, detok.vocoder_cfg, detok.params, detok.mel_norm, sc)
    n_shapes = det.warmup()
    assert n_shapes == len(det.chunk_shapes())
    fns = (det._chunk_fn, det._chunk_fn_grow)
    assert sum(f._cache_size() for f in fns) == n_shapes
    rng = np.random.default_rng(0)
    caps, resets = set(), 0
    for n in range(1, 33):  # every final length at every state up to past two resets
        tokens = rng.integers(0, det.dit_cfg.semantic_vocab_size, n)
        traces, _ = _run(det, tokens, lambda i, n: rng.standard_normal((n, 80)))
        caps |= {(t["cache_capacity"], t["cache_capacity_after"]) for t in traces}
        resets = max(resets, sum(t["start_position_id"] == 0 for t in traces) - 1)
    assert sum(f._cache_size() for f in fns) == n_shapes  # nothing compiled mid-stream
    assert {(0, 8), (8, 16), (16, 20), (20, 20), (0, 0)} <= caps and resets >= 2

"""Grain pipelines: ArrayRecord / jsonl sources -> builders -> packing -> mixture -> batches."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kimia_jax.training import data
from kimia_jax.training.examples import PretrainExampleBuilder, Truncation
from tests.training import helpers as h

SPEC = data.RowSpec(length=96, max_windows=2, pad_id=h.PAD, max_segments=8, wav_dtype="int16")


def _wav(tokens: int, seed: int) -> np.ndarray:
    n = 1280 * (tokens - 1) + 17
    return np.random.default_rng(seed).uniform(-0.3, 0.3, n).astype(np.float32)


def doc_record(i: int) -> dict:
    """A pt_docs record (§2.2) with 2-3 segments and inline 16 kHz audio."""
    rng = np.random.default_rng(i)
    nseg = 2
    clen = rng.integers(3, 9, nseg)
    tlen = rng.integers(1, 4, nseg)
    wavs = [_wav(int(n), 100 * i + k) for k, n in enumerate(clen)]
    return {
        "doc_id": f"doc{i}",
        "chunk_index": np.int32(0),
        "codes_orig_flat": rng.integers(0, h.NUM_CODES, int(clen.sum())).astype(np.uint16),
        "codes_len": clen.astype(np.int32),
        "text_ids_flat": rng.integers(10, 200, int(tlen.sum())).astype(np.int32),
        "text_ids_len": tlen.astype(np.int32),
        "seg_has_text": np.ones(nseg, bool),
        "num_samples_16k": np.array([len(w) for w in wavs], np.int64),
        "audio_flat": np.concatenate(wavs),
    }


def text_record(i: int) -> dict:
    rng = np.random.default_rng(1000 + i)
    return {"text_ids": rng.integers(10, 200, int(rng.integers(4, 40))).astype(np.int32)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    docs = data.write_records(
        d / "pt_docs-00000-of-00001.array_record", [doc_record(i) for i in range(40)]
    )
    text = data.write_records(
        d / "text-00000-of-00001.array_record", [text_record(i) for i in range(40)]
    )
    return docs, text


def _tasks(files, weights=(7.0, 1.0, 2.0), seeds=(1, 2, 3)) -> list[data.Task]:
    docs, text = files
    pt = PretrainExampleBuilder(
        h.tokenizer().extra_tokens, kimia_token_offset=h.OFFSET, truncation=Truncation(SPEC.length)
    )
    return [
        data.Task(
            "text_only",
            data.ArrayRecordSource(text),
            data.pretrain_builder(pt, "text_only"),
            weights[0],
            seeds[0],
        ),
        data.Task(
            "audio_only",
            data.ArrayRecordSource(docs),
            data.pretrain_builder(pt, "audio_only"),
            weights[1],
            seeds[1],
        ),
        data.Task(
            "asr",
            data.ArrayRecordSource(docs),
            data.pretrain_builder(pt, "asr"),
            weights[2],
            seeds[2],
        ),
    ]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_records_roundtrip(files):
    src = data.ArrayRecordSource(files[0])
    assert len(src) == 40
    rec = src[3]
    want = doc_record(3)
    for k, v in want.items():
        np.testing.assert_array_equal(rec[k], v)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        data.ArrayRecordSource("/nonexistent/*.array_record")


def test_same_seeds_same_batches_and_seed_matters(files):
    a = _take(iter(data.batches(_tasks(files), SPEC, 2, process_index=0, process_count=1)), 3)
    b = _take(iter(data.batches(_tasks(files), SPEC, 2, process_index=0, process_count=1)), 3)
    _same(a, b)
    c = _take(
        iter(
            data.batches(_tasks(files, seeds=(5, 6, 7)), SPEC, 2, process_index=0, process_count=1)
        ),
        3,
    )
    assert any(not np.array_equal(x["text_ids"], y["text_ids"]) for x, y in zip(a, c, strict=True))
    assert a[0]["audio_ids"].shape == (2, SPEC.length)
    assert a[0]["whisper_wav"].shape == (2, SPEC.max_windows, 480000)


def test_global_batch_independent_of_process_count(files):
    """Two processes' halves, concatenated, are the one-process global batch, row by row."""
    one = _take(iter(data.batches(_tasks(files), SPEC, 4, process_index=0, process_count=1)), 3)
    halves = [
        _take(iter(data.batches(_tasks(files), SPEC, 4, process_index=p, process_count=2)), 3)
        for p in range(2)
    ]
    two = [
        {k: np.concatenate([halves[0][i][k], halves[1][i][k]]) for k in one[i]} for i in range(3)
    ]
    _same(one, two)
    with pytest.raises(ValueError, match="does not divide"):
        data.batches(_tasks(files), SPEC, 4, process_index=0, process_count=3)


def test_mixture_proportions_and_packing_efficiency(files):
    """Rows per task over 1000 rows follow the weights 7:1:2 within 3 binomial sigmas."""
    stats = data.PackingStats()
    t0 = time.perf_counter()
    it = iter(data.mixture(_tasks(files), SPEC, buffer_size=32, stats=stats))
    rows = _take(it, 1000)
    dt = time.perf_counter() - t0
    counts = np.bincount([int(r["task_id"]) for r in rows], minlength=3)
    p = np.array([7, 1, 2]) / 10
    sigma = np.sqrt(1000 * p * (1 - p))
    assert np.all(np.abs(counts - 1000 * p) <= 3 * sigma), counts
    print(
        f"\nmixture rows per task {counts.tolist()} (want {(1000 * p).tolist()}); packing "
        f"efficiency {stats.efficiency:.3f} ({stats.examples} examples in {stats.rows} rows of "
        f"{SPEC.length}); {stats.examples / dt:.0f} examples/s, {stats.rows / dt:.0f} rows/s"
    )
    assert stats.efficiency > 0.5
    # every row is well formed: segment ids 1..n then 0, labels masked at segment ends
    for r in rows[:50]:
        seg = r["segment_ids"]
        n = int(r["num_examples"])
        assert set(np.unique(seg)) <= set(range(n + 1)) and seg.max() == n
        ends = np.nonzero(np.diff(seg) != 0)[0]
        assert not r["text_loss_mask"][ends].any() and not r["audio_loss_mask"][ends].any()


@pytest.mark.parametrize("at", [1, 3, 7])
def test_iterator_state_restores_exactly(files, at):
    """Save the state after `at` batches (mid packing buffer), restore it in a fresh pipeline:
    the next batches are the uninterrupted run's, through JSON."""

    def make():
        return iter(
            data.batches(_tasks(files), SPEC, 2, process_index=0, process_count=1, buffer_size=8)
        )

    ref = _take(make(), at + 4)
    it = make()
    _take(it, at)
    saved = data.state_to_json(it)
    it2 = make()
    data.state_from_json(it2, saved)
    _same(_take(it2, 4), ref[at:])


def test_official_sft_jsonl_source():
    """The official SFT jsonl (fixtures/training) through JsonlSource and the SFT builder."""
    src = data.JsonlSource(h.TRAIN_FIX / "data_with_semantic_codes.jsonl")
    spec = data.RowSpec(length=512, max_windows=2, pad_id=h.PAD, wav_dtype="int16")
    task = data.Task("sft", src, data.sft_builder(h.builder()), seed=0, num_epochs=1)
    rows = list(data.task_rows(task, 0, spec, buffer_size=16))
    want = sum(len(h.builder().official(r, h.TRAIN_FIX)) for r in h.records())
    assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == want
    assert sum(int(r["num_examples"]) for r in rows) == len(h.records())


def test_multiprocess_prefetch_same_batches_and_state(files):
    """`prefetch_workers=1` (a Grain worker process): the same batches as in-process, and its
    iterator state restores exactly."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads its absl flags (experiments.train parses them)

    def make(workers):
        return iter(
            data.batches(
                _tasks(files), SPEC, 2, process_index=0, process_count=1, buffer_size=8,
                prefetch_workers=workers,
            )
        )  # fmt: skip

    ref = _take(make(0), 5)
    it = make(1)
    got = _take(it, 3)
    state = it.get_state()
    got += _take(it, 2)
    _same(got, ref)
    it2 = make(1)
    it2.set_state(state)
    _same(_take(it2, 2), ref[3:])

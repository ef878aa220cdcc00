"""The detokenizer work queue's schedules, on a fake clock (no model: the order itself)."""

import numpy as np
import pytest

from kimia_jax.serving.detok_queue import DetokQueue

FIRST, CHUNK = 3, 2  # tokens per first / later chunk


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def codes(n, start=0):
    return np.arange(start, start + n, dtype=np.int64)


def run(q, job, audio_s, clock=None, dt=0.0):
    """Plays a worker: each chunk of the job yields `audio_s` seconds; returns the chunk count."""
    s, tokens, final = job
    need = FIRST if s.chunks == 0 else CHUNK
    n_chunks, left = 0, tokens
    while left.size > need:
        n_chunks, left, need = n_chunks + 1, left[need:], CHUNK
    if final and left.size:
        n_chunks, left = n_chunks + 1, left[:0]
    if clock is not None:
        clock.t += dt
    q.release(s, left, chunks=s.chunks + n_chunks, audio_s=audio_s * n_chunks, finished=final)
    return n_chunks


def test_first_chunk_goes_ahead_then_earliest_deadline():
    """Reply A has audio and 3 later chunks pending; B and C (submitted later, C before B) have
    just completed their first chunk: C's then B's first chunk run before A's later ones. Then
    the reply whose real-time playback runs dry first (first audio + seconds sent) goes next,
    one chunk per job."""
    clock = Clock()
    q = DetokQueue("first_chunk", FIRST, CHUNK, clock=clock)
    q.put("A", codes(FIRST + 1), submitted=0.0)
    s, tokens, final = job = q.take(timeout=0)
    assert s.key == "A" and tokens.tolist() == [0, 1, 2, 3] and not final  # a chunk + 1 token
    clock.t = 1.0
    assert run(q, job, audio_s=0.5) == 1  # A: first audio at 1.0, 0.5 s sent: deadline 1.5
    q.put("A", codes(3 * CHUNK, start=4))
    q.put("B", codes(FIRST), submitted=0.5)
    assert q.next_job()[0].key == "A"  # B's first chunk is not complete (needs one more token)
    q = DetokQueue("first_chunk", FIRST, CHUNK, clock=clock)
    clock.t = 0.0
    q.put("A", codes(FIRST + 1), submitted=0.0)
    clock.t = 1.0
    run(q, q.take(timeout=0), audio_s=0.5)  # deadline 1.5
    q.put("A", codes(3 * CHUNK, start=4))
    q.put("B", codes(FIRST + 1), submitted=0.5)
    q.put("C", codes(FIRST + 1), submitted=0.2)
    order = []
    for _ in range(2):
        job = q.take(timeout=0)
        order.append(job[0].key)
        clock.t += 0.1
        run(q, job, audio_s=0.5)
    assert order == ["C", "B"]  # C: first audio 1.1, deadline 1.6; B: 1.2 -> 1.7
    job = q.take(timeout=0)
    assert job[0].key == "A" and job[1].size == CHUNK + 1  # deadline 1.5 first; one chunk
    run(q, job, audio_s=0.5)  # A: deadline 2.0
    q.put("C", codes(CHUNK + 1, start=4))
    assert q.take(timeout=0)[0].key == "C"  # 1.6 < 2.0, although A still has 2 chunks pending


def test_fifo_takes_arrival_order_with_all_complete_chunks():
    q = DetokQueue("fifo", FIRST, CHUNK, clock=Clock())
    q.put("A", codes(FIRST + 1), submitted=0.0)
    run(q, q.take(timeout=0), audio_s=0.5)
    q.put("A", codes(3 * CHUNK, start=4))  # complete first
    q.put("B", codes(FIRST + 1), submitted=1.0)
    s, tokens, final = q.take(timeout=0)
    assert s.key == "A" and tokens.size == 1 + 3 * CHUNK and not final  # all pending in one job


def test_reply_is_held_by_one_worker_and_ends_with_its_final_job():
    q = DetokQueue("first_chunk", FIRST, CHUNK, clock=Clock())
    q.put("A", codes(FIRST + 2 * CHUNK + 1), submitted=0.0)
    job = q.take(timeout=0)
    assert q.next_job() is None  # A is busy: a second worker gets nothing
    q.put("A", codes(1, start=100), final={"done": True})
    run(q, job, audio_s=0.5)
    seen = []
    while (job := q.take(timeout=0)) is not None:
        seen.append((job[1].tolist(), job[2]))
        run(q, job, audio_s=0.5)
    # each job is one chunk + the token proving it is not the last (the leftover token goes
    # back in front), then the final remainder with the late token: the chunks of
    # plan_chunks(9, 3, 2) = [0:3], [3:5], [5:7], [7:9 final]
    assert seen == [([3, 4, 5], False), ([5, 6, 7], False), ([7, 100], True)]
    assert len(q) == 0


def test_dropped_and_failed_replies():
    q = DetokQueue("first_chunk", FIRST, CHUNK, clock=Clock())
    q.put("A", codes(FIRST + 1), submitted=0.0)
    q.drop("A")
    assert q.next_job() is None and len(q) == 0
    q.put("B", codes(FIRST + 1), submitted=0.0)
    s, tokens, _ = q.take(timeout=0)
    q.release(s, tokens[:0], chunks=0, audio_s=0.0, failed=True)
    q.put("B", codes(FIRST + 1))  # codes of a failed reply are ignored ...
    assert q.next_job() is None and len(q) == 0
    q.put("B", codes(0), final={"done": True})  # ... until its end
    q.put("B", codes(FIRST + 1))
    assert len(q) == 1
    with pytest.raises(ValueError, match="detok_schedule"):
        DetokQueue("lifo", FIRST, CHUNK)


def test_closed_queue_drains_then_wakes_workers():
    q = DetokQueue("fifo", FIRST, CHUNK)
    q.put("A", codes(2), {"done": True})
    q.put("B", codes(2))  # still running: nothing complete
    q.close()
    job = q.take()
    assert job[0].key == "A" and job[2]  # the ended reply is finished
    run(q, job, audio_s=0.5)
    assert q.take() is None

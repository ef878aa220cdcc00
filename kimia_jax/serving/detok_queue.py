"""Which spoken reply the detokenizer works on next: the engine's detokenizer work queue.

The engine thread hands each spoken reply's new semantic codes (and, at its end, its final
event) to a `DetokQueue`; detokenizer workers `take` one job at a time, run it
(`Detokenizer.detokenize_ready` on the reply's state) and `release` the reply with the tokens
left over. A reply's codes are kept together (codes that arrive while it waits join its pending
tokens, so a reply that fell behind is served in one job instead of one per engine tick), and a
reply is never held by two workers at once, so its chunks stay in order and its audio equals
`Detokenizer.detokenize` of its codes whatever the schedule.

Schedules (`EngineConfig.detok_schedule`):
  "first_chunk": a job is one chunk (or the final remainder) of a reply that has a complete
    chunk. Replies that have produced no audio yet go first (in submission order), so a new
    reply's first chunk never waits behind the later chunks of older ones; then earliest
    deadline first, the deadline of a reply being when a client playing it in real time runs out
    of audio (its first audio + the seconds of audio it has been sent). Every reply's deadline
    moves forward as it is served, so none starves.
  "fifo": the reply whose oldest pending codes arrived first, with all its complete chunks in one
    job (the engine's original behaviour: a single queue in arrival order).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Any

import numpy as np

SCHEDULES = ("first_chunk", "fifo")


@dataclasses.dataclass(eq=False)
class Stream:
    """One spoken reply's detokenizer work: pending codes, state, progress.

    `key` identifies the reply (any hashable), `submitted` is its `time.perf_counter()` submit
    time; `state` belongs to the worker holding the stream (None until its first job)."""

    key: Any
    submitted: float
    seq: int  # when it last came to have complete work (the "fifo" order)
    pending: np.ndarray
    final: dict[str, Any] | None = None  # the reply's final event, once it has ended
    state: Any = None
    chunks: int = 0  # chunks decoded so far
    audio_s: float = 0.0  # seconds of audio emitted so far
    first_audio_at: float | None = None  # perf_counter time of the first audio
    busy: bool = False
    dropped: bool = False
    queued: bool = False  # has complete work with its current seq
    payload: Any = None  # the caller's object (the engine's Request)


class DetokQueue:
    """Thread-safe pending detokenizer work of the spoken replies (see the module docstring).

    Args:
      schedule: "first_chunk" or "fifo".
      first_chunk_size, chunk_size: tokens per chunk (`StreamingConfig`); a chunk is complete once
        one more token is in (the detokenizer's rule).
      clock: time source of the deadlines (tests pass a fake one).
    """

    def __init__(
        self,
        schedule: str,
        first_chunk_size: int,
        chunk_size: int,
        clock: Any = time.perf_counter,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"detok_schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.first_chunk_size, self.chunk_size = first_chunk_size, chunk_size
        self.clock = clock
        self._cond = threading.Condition()
        self._streams: dict[Any, Stream] = {}
        self._failed: set[Any] = set()  # replies whose detokenization failed: later codes ignored
        self._seq = itertools.count()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._streams)

    def put(
        self,
        key: Any,
        codes: np.ndarray,
        final: dict[str, Any] | None = None,
        *,
        submitted: float = 0.0,
        payload: Any = None,
    ) -> None:
        """Adds a reply's new codes (in order); `final` (its final event) marks its end."""
        with self._cond:
            if key in self._failed:
                if final is not None:  # the reply's end: forget it
                    self._failed.discard(key)
                return
            s = self._streams.get(key)
            if s is None:
                s = Stream(key, submitted, next(self._seq), codes[:0], payload=payload)
                self._streams[key] = s
            if s.dropped:
                return
            if codes.size:
                s.pending = np.concatenate([s.pending, codes])
            if final is not None:
                s.final = final
            self._mark(s)
            self._cond.notify_all()

    def drop(self, key: Any) -> None:
        """Forgets a reply (cancelled, timed out, failed); a job running on it is discarded."""
        with self._cond:
            self._failed.discard(key)
            s = self._streams.get(key)
            if s is None:
                return
            s.dropped = True
            if not s.busy:
                del self._streams[key]

    def close(self) -> None:
        """Wakes every worker; `take` hands out the jobs still ready (replies that ended are
        finished), then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _need(self, s: Stream) -> int:
        return self.first_chunk_size if s.chunks == 0 else self.chunk_size

    def _complete(self, s: Stream) -> bool:
        """A complete chunk is pending, or the reply has ended (its remainder is final)."""
        return s.pending.size > self._need(s) or s.final is not None

    def _mark(self, s: Stream) -> None:
        if not s.queued and self._complete(s):
            s.seq, s.queued = next(self._seq), True

    def _ready(self, s: Stream) -> bool:
        return not (s.busy or s.dropped) and self._complete(s)

    def _priority(self, s: Stream) -> tuple[Any, ...]:
        if self.schedule == "fifo":
            return (s.seq,)
        if s.first_audio_at is None:
            return (0, s.submitted, s.seq)
        return (1, s.first_audio_at + s.audio_s, s.seq)

    def next_job(self) -> tuple[Stream, np.ndarray, bool] | None:
        """The job `take` would return now, without blocking (None if nothing is ready)."""
        with self._cond:
            ready = [s for s in self._streams.values() if self._ready(s)]
            if not ready:
                return None
            s = min(ready, key=self._priority)
            need = self._need(s)
            if self.schedule == "first_chunk" and s.pending.size > need:
                tokens, final = s.pending[: need + 1], False  # one chunk (+1 proves it is not last)
            else:
                tokens, final = s.pending, s.final is not None
            s.pending = s.pending[tokens.size :]
            s.busy, s.queued = True, False
            return s, tokens, final

    def take(self, timeout: float | None = None) -> tuple[Stream, np.ndarray, bool] | None:
        """Blocks for the next job: (stream, tokens to pass to `detokenize_ready`, final).
        None once closed and drained (or after `timeout` seconds with nothing ready)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                job = self.next_job()
                if job is not None or self._closed:
                    return job
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(timeout=left)

    def release(
        self,
        s: Stream,
        leftover: np.ndarray,
        *,
        chunks: int,
        audio_s: float,
        finished: bool = False,
        failed: bool = False,
    ) -> None:
        """A worker is done with its job: `leftover` tokens go back in front of the pending ones;
        `chunks` (total decoded) and `audio_s` (seconds emitted by this job) update its progress.
        `finished` (its final job ran) removes the reply; `failed` too, and its later codes are
        ignored until its end."""
        with self._cond:
            s.busy = False
            if audio_s > 0 and s.first_audio_at is None:
                s.first_audio_at = self.clock()
            s.audio_s += audio_s
            s.chunks = chunks
            s.pending = np.concatenate([leftover, s.pending])
            self._mark(s)
            if failed and not s.dropped and s.final is None:
                self._failed.add(s.key)
            if finished or failed or s.dropped:
                self._streams.pop(s.key, None)
            self._cond.notify_all()

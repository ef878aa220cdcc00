"""Continuous-batching engine: a bounded request queue, fixed decode slots, streamed results.

    engine = Engine.from_kimia(kimia, EngineConfig(slots=8))
    engine.start()
    handle = engine.submit(prompt, OutputType.BOTH, Sampling(), seed=0)   # or EngineBusy
    for event in handle.events():   # {"text": piece} / {"audio": 24 kHz samples} / final {"done"}
        ...
    engine.stop()

One engine thread owns the compiled state (`serving.slots`): each tick it admits queued requests
into free slots, runs one prefill chunk (so a long prompt never stalls the running rows for more
than one chunk), then `steps_per_tick` decode steps of every running row, and turns each row's
new tokens into text pieces and semantic codes. Detokenizer threads (`detok_workers`) stream the
audio: each "both" request's codes are decoded chunk by chunk as they complete
(`Detokenizer.detokenize_ready`, the same chunks and noise as `KimiAudio.generate`), so audio
streams while the LLM keeps decoding; `serving.detok_queue` decides which reply's chunk runs next
(by default a reply's first chunk goes ahead of the later chunks of older replies).
Requests leave their slot when they stop, are cancelled or time out; a full queue answers
`EngineBusy` with a retry-after estimate instead of growing.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kimia_jax import sharding
from kimia_jax.configs import OutputType
from kimia_jax.errors import KimiaError, PromptError
from kimia_jax.inference import stream_logic
from kimia_jax.inference.pipeline import TextDecoder, new_text_piece
from kimia_jax.inference.sampler import Sampling
from kimia_jax.serving import slots as slots_lib
from kimia_jax.serving.detok_queue import SCHEDULES, DetokQueue, Stream
from kimia_jax.serving.metrics import EngineMetrics
from kimia_jax.text.conversation import Prompt, batch


class EngineBusy(KimiaError):
    """The request queue is full; `retry_after` seconds is the engine's estimate of a free turn."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Attributes:
    slots: rows of the compiled decode loop (concurrent requests).
    capacity: KV cache positions per slot (prompt + generated tokens).
    prefill_chunk: prompt positions per prefill call.
    steps_per_tick: decode steps between two scheduling points.
    max_queue: requests waiting for a slot before `submit` answers EngineBusy.
    request_timeout_s: a request still running (or waiting) after this long is ended.
    max_top_k: largest top_k sampled exactly (a larger one samples the full distribution).
    detok_schedule: which spoken reply's audio chunk is decoded next (`serving.detok_queue`):
      "first_chunk" (replies with no audio yet first, then earliest playback deadline) or "fifo"
      (arrival order, the original behaviour).
    detok_workers: detokenizer threads (each works on one reply at a time).
    """

    slots: int = 4
    capacity: int = 1024
    prefill_chunk: int = 64
    steps_per_tick: int = 8
    max_queue: int = 32
    request_timeout_s: float = 300.0
    max_top_k: int = 64
    detok_schedule: str = "first_chunk"
    detok_workers: int = 1

    def __post_init__(self) -> None:
        for name in (
            "slots", "capacity", "prefill_chunk", "steps_per_tick", "max_queue", "detok_workers",
        ):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {v!r}")
        if self.capacity % self.prefill_chunk:
            raise ValueError(
                f"EngineConfig.capacity ({self.capacity}) must be a multiple of prefill_chunk "
                f"({self.prefill_chunk})"
            )
        if self.detok_schedule not in SCHEDULES:
            raise ValueError(
                f"EngineConfig.detok_schedule must be one of {SCHEDULES}, "
                f"got {self.detok_schedule!r}"
            )
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


_DONE = object()


class Request:
    """One submitted request: its prompt and settings, its event queue, its progress."""

    def __init__(
        self,
        rid: int,
        prompt: Prompt,
        output_type: OutputType,
        sampling: Sampling,
        seed: int,
        budget: int,
        deadline: float,
        voice: Any = None,
    ):
        self.id, self.prompt, self.output_type = rid, prompt, output_type
        self.voice = voice  # VoicePrompt of the spoken reply (None: the engine's default)
        self.sampling, self.seed, self.budget, self.deadline = sampling, seed, budget, deadline
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None
        self.first_audio_s: float | None = None
        self._events: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" | "error"
        self.error: str | None = None
        self.tokens: tuple[list[int], list[int]] = ([], [])  # (audio, text) as generate returns
        # engine-side progress
        self.slot: int | None = None
        self.prefilled = 0
        self.text_sent = ""
        self.text_seen = 0  # text tokens already decoded
        self.audio_sent = 0
        self.num_text_tokens = 0

    @property
    def both(self) -> bool:
        return self.output_type == OutputType.BOTH

    def cancel(self) -> None:
        """Ends the request at the next tick (its slot is freed); events end with reason
        "cancelled"."""
        self.cancelled.set()

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """{"text": piece} and {"audio": float32 24 kHz samples} events, then one
        {"done": True, "reason": ..., "text": full text, "tokens": (audio, text)}."""
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if ev.get("done"):
                return

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Waits for the end: {"text", "audio" (concatenated samples or None), "reason",
        "tokens", "error"}."""
        audio = []
        final: dict[str, Any] = {}
        for ev in self.events(timeout):
            if ev.get("audio") is not None:
                audio.append(ev["audio"])
            if ev.get("done"):
                final = ev
        final = dict(final)
        final["audio"] = np.concatenate(audio) if audio else None
        return final

    def _put(self, ev: dict[str, Any]) -> None:
        self._events.put(ev)


class Engine:
    """Continuous batching over `serving.slots` (see the module docstring).

    Args:
      params, model: the KimiaLLM params and module.
      extra_tokens: the text tokenizer's `ExtraTokens` (stream ids).
      text: `pipeline.TextDecoder` (text pieces and semantic codes from token ids).
      detokenizer: `Detokenizer` or None (then "both" requests are refused).
      feature_dim: whisper feature width of the LLM's prompts (None: no features).
      mesh: the LLM's mesh (None: default device).
      config: `EngineConfig`.
    """

    def __init__(
        self,
        params: Any,
        model: Any,
        extra_tokens: Any,
        text: TextDecoder,
        detokenizer: Any | None,
        feature_dim: int | None,
        mesh: Any = None,
        config: EngineConfig | None = None,
        voice_prompt: Any = None,
    ):
        self.params, self.model, self.text, self.detokenizer = params, model, text, detokenizer
        self.voice_prompt = voice_prompt  # default `VoicePrompt` of spoken replies (or None)
        self.feature_dim, self.mesh = feature_dim, mesh
        self.config = config or EngineConfig()
        self.cfgs = slots_lib.stream_configs(extra_tokens)
        self.metrics = EngineMetrics(self.config.slots)
        self._queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._slots: list[Request | None] = [None] * self.config.slots
        self._ids = itertools.count()
        self._running = False
        self._thread: threading.Thread | None = None
        sc = detokenizer.streaming if detokenizer is not None else None
        self._detok = DetokQueue(
            self.config.detok_schedule,
            sc.first_chunk_size if sc else 1,
            sc.chunk_size if sc else 1,
        )
        self._detok_threads: list[threading.Thread] = []
        self._avg_request_s = 5.0
        with sharding.mesh_context(mesh):
            self.state = slots_lib.SlotState.init(
                model.cfg, self.config.slots, self.config.capacity
            )

    @classmethod
    def from_kimia(
        cls, kimia: Any, config: EngineConfig | None = None, voice_prompt: Any = None
    ) -> Engine:
        """The engine over a loaded `KimiAudio` (its params, possibly quantized, tokenizers and
        detokenizer); `voice_prompt` (a clip or `VoicePrompt`, `KimiAudio.voice_prompt`) is the
        default voice of spoken replies."""
        cfg = kimia.cfg
        return cls(
            kimia.params,
            kimia.model,
            kimia.extra_tokens,
            kimia.text_decoder,
            kimia.detokenizer,
            cfg.kimia_adaptor_input_dim if cfg.use_whisper_feature else None,
            kimia.mesh,
            config,
            None if voice_prompt is None else kimia.voice_prompt(voice_prompt),
        )

    # ------------------------------------------------------------------------------------------
    # client side

    def start(self) -> Engine:
        if self._running:
            return self
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="kimia-engine", daemon=True)
        self._thread.start()
        if self.detokenizer is not None:
            self._detok_threads = [
                threading.Thread(target=self._detok_loop, name=f"kimia-detok-{i}", daemon=True)
                for i in range(self.config.detok_workers)
            ]
            for t in self._detok_threads:
                t.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self._detok.close()
        for t in (self._thread, *self._detok_threads):
            if t is not None:
                t.join(timeout=30)

    def budget_for(self, prompt_len: int, output_type: OutputType, max_new_tokens: int) -> int:
        """The official budget (`stream_logic.budgets`), cut to what fits the slot's cache."""
        official = int(stream_logic.budgets(output_type, [prompt_len], max_new_tokens)[0])
        return min(official, self.config.capacity - prompt_len)

    def submit(
        self,
        prompt: Prompt,
        output_type: OutputType | str = OutputType.TEXT,
        sampling: Sampling | None = None,
        seed: int = 0,
        timeout_s: float | None = None,
        voice_prompt: Any = None,
    ) -> Request:
        """Queues a built prompt; returns its `Request` (events stream from it). `voice_prompt`
        (a `VoicePrompt`, output_type "both") overrides the engine's default voice.

        Raises PromptError when the prompt cannot fit a slot, OutputError-like PromptError when
        audio output is asked without a detokenizer, EngineBusy when the queue is full.
        """
        output_type = OutputType.parse(output_type)
        sampling = sampling or Sampling()
        if output_type == OutputType.BOTH and self.detokenizer is None:
            raise PromptError('output_type "both" needs the detokenizer, which is not loaded')
        if voice_prompt is not None and output_type != OutputType.BOTH:
            raise PromptError('voice_prompt sets the voice of spoken replies: it needs "both"')
        t = len(prompt)
        if t + 1 > self.config.capacity:
            raise PromptError(
                f"prompt of {t} positions does not fit a slot of {self.config.capacity} "
                "positions (EngineConfig.capacity / --capacity)"
            )
        if self.feature_dim is None and prompt.features:
            raise PromptError("this model takes no whisper features, but the prompt has some")
        budget = self.budget_for(t, output_type, sampling.max_new_tokens)
        if budget < 1:
            raise PromptError(f"prompt of {t} positions leaves no generation budget")
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if not self._running:
                raise RuntimeError("the engine is not running (call start())")
            if len(self._queue) >= self.config.max_queue:
                retry = self._retry_after()
                self.metrics.rejected.inc()
                raise EngineBusy(
                    f"busy: {len(self._queue)} requests are waiting for {self.config.slots} "
                    f"slots; retry after {retry} s",
                    retry,
                )
            req = Request(
                next(self._ids),
                prompt,
                output_type,
                sampling,
                seed,
                budget,
                time.perf_counter() + timeout,
                voice=voice_prompt,
            )
            self._queue.append(req)
            self.metrics.queue_length.set(len(self._queue))
            self._lock.notify_all()
        return req

    def _retry_after(self) -> int:
        waves = (len(self._queue) + 1) / self.config.slots
        return max(1, math.ceil(self._avg_request_s * waves))

    @property
    def active_slots(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------------------------------
    # engine thread

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """Ends a request (slot freed by the caller); the final event comes after its audio."""
        if req.finished.is_set():
            return
        req.reason, req.error = reason, error
        req.finished.set()
        self.metrics.requests.labels(reason).inc()
        if reason in ("stop", "length"):
            dt = time.perf_counter() - req.submitted
            self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * dt
        final = {
            "done": True,
            "reason": reason,
            "text": req.text_sent,
            "tokens": req.tokens,
            "error": error,
            "steps": req.num_text_tokens,
        }
        if req.both and reason in ("stop", "length"):
            self._detok_put(req, np.zeros((0,), np.int64), final)
        else:
            if req.both:
                self._detok.drop(req.id)  # its pending codes and detokenizer state
            req._put(final)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None

    def _admit(self) -> None:
        now = time.perf_counter()
        with self._lock:
            for req in list(self._queue):
                if req.cancelled.is_set() or now > req.deadline:
                    self._queue.remove(req)
                    self._finish(req, "cancelled" if req.cancelled.is_set() else "timeout")
            for s in range(self.config.slots):
                if self._slots[s] is None and self._queue:
                    req = self._queue.popleft()
                    req.slot = s
                    self._slots[s] = req
            self.metrics.queue_length.set(len(self._queue))
        for s, req in enumerate(self._slots):
            if req is not None and (req.cancelled.is_set() or now > req.deadline):
                self._finish(req, "cancelled" if req.cancelled.is_set() else "timeout")
                self._free(s)
        self.metrics.active_slots.set(self.active_slots)

    def _prefill_one(self) -> bool:
        """One chunk of the waiting prefill that started first; True if one ran."""
        pending = [r for r in self._slots if r is not None and r.prefilled < len(r.prompt)]
        if not pending:
            return False
        req = min(pending, key=lambda r: r.id)
        c, t = self.config.prefill_chunk, len(req.prompt)
        if req.prefilled == 0:
            pad = -(-t // c) * c
            req._batch = batch([req.prompt], pad, feature_dim=self.feature_dim)  # type: ignore[attr-defined]
        pb = req._batch  # type: ignore[attr-defined]
        s0 = req.prefilled
        sl = slice(s0, s0 + c)
        args = (
            jnp.asarray(pb.audio_ids[:, sl], jnp.int32),
            jnp.asarray(pb.text_ids[:, sl], jnp.int32),
            None if pb.features is None else jnp.asarray(pb.features[:, sl], jnp.float32),
            None if pb.features is None else jnp.asarray(pb.is_continuous[:, sl]),
            jnp.int32(s0),
        )
        slot = jnp.int32(req.slot)
        last = s0 + c >= t
        with sharding.mesh_context(self.mesh):
            if not last:
                self.state = slots_lib.prefill_chunk(
                    self.params, self.state, slot, *args, model=self.model
                )
            else:
                self.state = slots_lib.prefill_last(
                    self.params,
                    self.state,
                    slot,
                    *args,
                    self._row(req),
                    model=self.model,
                    cfgs=self.cfgs,
                    max_top_k=self.config.max_top_k,
                )
        req.prefilled = min(s0 + c, t)
        return True

    def _row(self, req: Request) -> slots_lib.Row:
        def params(stream: str) -> slots_lib.RowParams:
            p = getattr(req.sampling, stream)
            return slots_lib.RowParams(
                temperature=jnp.asarray([p.temperature], jnp.float32),
                top_k=jnp.asarray([p.top_k], jnp.int32),
                penalty=jnp.asarray([p.repetition_penalty], jnp.float32),
                window=jnp.asarray([p.repetition_window], jnp.int32),
            )

        return slots_lib.Row(
            length=jnp.asarray([len(req.prompt)], jnp.int32),
            budget=jnp.asarray([req.budget], jnp.int32),
            is_both=jnp.asarray([req.both]),
            key=jax.random.key_data(jax.random.key(req.seed))[None],
            text=params("text"),
            audio=params("audio"),
        )

    def _live(self) -> np.ndarray:
        return np.asarray(
            [r is not None and r.prefilled >= len(r.prompt) for r in self._slots], bool
        )

    def _emit(self) -> int:
        """New text pieces and codes of every running row; rows that stopped leave. Returns the
        number of decode steps run since the last call."""
        live = self._live()
        total = 0
        if not live.any():
            return total
        st = jax.device_get(self.state.stream)
        for s in np.flatnonzero(live):
            req = self._slots[s]
            assert req is not None
            vt, va, d = int(st.valid_text[s]), int(st.valid_audio[s]), self.cfgs[0].audio_delay
            text_ids = st.text_history[s, :vt].tolist()
            audio_ids = st.audio_history[s, d : d + va].tolist()
            done = bool(st.done[s])
            if req.first_token_s is None and int(st.step[s]) > 0:
                req.first_token_s = time.perf_counter() - req.submitted
                self.metrics.ttft.observe(req.first_token_s)
            new_tokens = int(st.step[s]) - req.num_text_tokens
            req.num_text_tokens = int(st.step[s])
            self.metrics.tokens.inc(new_tokens)
            total += new_tokens
            if vt != req.text_seen or done:  # decode only when the text grew (or at the end)
                req.text_seen = vt
                piece = new_text_piece(self.text.text(text_ids), req.text_sent, final=done)
                if piece:
                    req.text_sent += piece
                    req._put({"text": piece})
            if req.both:
                codes = self.text.codes(audio_ids[req.audio_sent :])
                req.audio_sent = len(audio_ids)
                if codes.size:
                    self._detok_put(req, codes)
            if done:
                req.tokens = (audio_ids, text_ids)
                stopped_on_budget = int(st.step[s]) >= req.budget
                self._finish(req, "length" if stopped_on_budget else "stop")
                self._free(s)
        return total

    def _loop(self) -> None:
        cfg = self.config
        while True:
            with self._lock:
                while self._running and not self._queue and self.active_slots == 0:
                    self._lock.wait(timeout=0.5)
                if not self._running:
                    break
            try:
                self._admit()
                ran_prefill = self._prefill_one()
                live = self._live()
                if live.any():
                    t0 = time.perf_counter()
                    with sharding.mesh_context(self.mesh):
                        self.state = slots_lib.decode(
                            self.params,
                            self.state,
                            jnp.asarray(live),
                            jnp.int32(cfg.steps_per_tick),
                            model=self.model,
                            cfgs=self.cfgs,
                            max_top_k=cfg.max_top_k,
                        )
                    n = self._emit()
                    self.metrics.step_time(time.perf_counter() - t0, n)
                elif ran_prefill:
                    self._emit()
                self.metrics.active_slots.set(self.active_slots)
            except Exception as e:  # a failing tick ends its requests, the engine keeps going
                logging.exception("engine tick failed")
                for s, req in enumerate(self._slots):
                    if req is not None:
                        self._finish(req, "error", f"{type(e).__name__}: {e}")
                        self._free(s)
                with sharding.mesh_context(self.mesh):
                    self.state = slots_lib.SlotState.init(self.model.cfg, cfg.slots, cfg.capacity)
        for s, req in enumerate(self._slots):
            if req is not None:
                self._finish(req, "cancelled", "the engine stopped")
                self._free(s)
        while self._queue:
            self._finish(self._queue.popleft(), "cancelled", "the engine stopped")

    def _detok_put(self, req: Request, codes: np.ndarray, final: dict | None = None) -> None:
        self._detok.put(req.id, codes, final, submitted=req.submitted, payload=req)

    def _detok_loop(self) -> None:
        """One detokenizer worker: runs the jobs of `self._detok` until the engine stops."""
        while (job := self._detok.take()) is not None:
            self._detok_job(*job)

    def _detok_job(self, stream: Stream, tokens: np.ndarray, final: bool) -> None:
        """One job of the detokenizer queue: the reply's complete chunks in `tokens` (in order,
        on its state), their audio events, and after its final chunk its final event."""
        req: Request = stream.payload
        if stream.state is None:
            voice = req.voice if req.voice is not None else self.voice_prompt
            stream.state = self.detokenizer.new_state(voice)
        try:
            pieces, stream.state, left = self.detokenizer.detokenize_ready(
                stream.state, tokens, final=final, key=req.seed
            )
        except Exception as e:  # noqa: BLE001 - reported on the request
            logging.exception("detokenizer failed")
            self._detok.release(stream, tokens[:0], chunks=0, audio_s=0.0, failed=True)
            req._put(
                {
                    "done": True,
                    "reason": "error",
                    "error": f"detokenizer: {e}",
                    "text": req.text_sent,
                    "tokens": req.tokens,
                }
            )
            return
        if stream.dropped:  # cancelled while this job ran
            self._detok.release(stream, left, chunks=0, audio_s=0.0)
            return
        for p in pieces:
            if req.first_audio_s is None:
                req.first_audio_s = time.perf_counter() - req.submitted
                self.metrics.first_audio.observe(req.first_audio_s)
            req._put({"audio": p})
        audio_s = sum(len(p) for p in pieces) / self.detokenizer.vocoder_cfg.sampling_rate
        self.metrics.audio_seconds.inc(audio_s)
        if final:
            req._put(dict(stream.final, tokens=req.tokens))
        self._detok.release(
            stream, left, chunks=stream.state.chunk_index, audio_s=audio_s, finished=final
        )

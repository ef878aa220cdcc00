"""The real-time conversation session behind `WS /v1/realtime` (protocol: `serving/server.py`).

One `RealtimeSession` per connection. Its receive loop never waits for a reply: microphone frames
keep flowing into the energy VAD while a reply streams, each ended turn starts an asyncio task
(`_respond`) and the tasks run one at a time, in turn order (a task waits for the previous one
before it builds its prompt). Barge-in: speech onset while a reply runs cancels its engine request
and answers `response.cancelled` at once; the reply's task stops forwarding and frees the slot.

Multi-turn memory (`Conversation`): the session keeps the official-format messages of the
conversation, user turns as "audio" messages and replies as assistant "text" messages, or, for
spoken replies that the builder can lay out, "audio-text" messages carrying the reply's semantic
codes (`audio_tokens`) and transcript (text/conversation.py, builder version 349251e). Each clip is
encoded once (`pipeline.encode_audio`) and every prompt is built by the model's one
`PromptBuilder` (`pipeline.build_prompts`). When the prompt and `reply_tokens` positions for the
reply would not fit an engine slot, the oldest exchanges are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
from typing import Any

import numpy as np
from absl import logging
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from kimia_jax.configs import OutputType
from kimia_jax.errors import KimiaError
from kimia_jax.inference import pipeline
from kimia_jax.inference.sampler import Sampling
from kimia_jax.serving import openai_api as oa
from kimia_jax.serving.engine import Engine, EngineBusy, Request
from kimia_jax.serving.vad import EnergyVad, VadConfig
from kimia_jax.text.conversation import AUDIO_DELAY, MESSAGE_TYPES, Prompt

Message = dict[str, Any]


async def next_event(req: Request) -> dict[str, Any]:
    """The request's next engine event, awaited without blocking the event loop."""
    while True:
        try:
            return await run_in_threadpool(req._events.get, True, 0.5)
        except queue.Empty:
            continue


def _first_exchange(messages: list[Message]) -> int:
    """Number of messages of the oldest exchange (user turn(s) and the reply that followed)."""
    for i in range(1, len(messages)):
        if messages[i]["role"] == "user" and messages[i - 1]["role"] != "user":
            return i
    return len(messages)


@dataclasses.dataclass(frozen=True)
class Built:
    """A turn's prompt: `messages` (kept history + the new user turn), `trimmed` exchanges dropped
    to fit the slot, and the new clip's encoding."""

    prompt: Prompt
    messages: list[Message]
    trimmed: int
    encoded: pipeline.EncodedAudio


class Conversation:
    """A session's memory (module docstring). Not thread-safe: `encode` may run in a worker
    thread, everything else on the event loop.

    Args:
      kimia: the loaded `KimiAudio` (tokenizers, Whisper, the prompt builder).
      capacity: positions of an engine slot (`EngineConfig.capacity`).
      reply_tokens: positions kept free for the reply when trimming (at most half the slot).
    """

    def __init__(self, kimia: Any, capacity: int, reply_tokens: int):
        if reply_tokens < 1:
            raise ValueError(f"reply_tokens must be >= 1, got {reply_tokens}")
        self.kimia, self.capacity, self.reply_tokens = kimia, capacity, reply_tokens
        self.messages: list[Message] = []
        self.epoch = 0  # bumped by reset: replies of an older epoch are not remembered
        self._codes: dict[Any, np.ndarray] = {}
        self._features: dict[Any, np.ndarray] = {}

    @property
    def reserve(self) -> int:
        return min(self.reply_tokens, self.capacity // 2)

    def reset(self) -> None:
        self.messages, self._codes, self._features = [], {}, {}
        self.epoch += 1

    def encode(self, turn: np.ndarray, sample_rate: int) -> tuple[tuple, pipeline.EncodedAudio]:
        """The turn as an `(array, sample_rate)` clip and its codes / features (the slow part)."""
        clip = (np.asarray(turn, np.float32), int(sample_rate))
        wavs = pipeline.load_clips([clip])
        kimia = self.kimia
        return clip, pipeline.encode_audio(wavs, [clip], kimia.audio_tokenizer, kimia.whisper)

    def build(
        self, clip: tuple, encoded: pipeline.EncodedAudio, output: OutputType, memory: bool = True
    ) -> Built:
        """The prompt of the history (if `memory`) plus the user turn `clip`; the oldest
        exchanges are dropped while prompt + `reserve` exceeds the slot."""
        user = {"role": "user", "message_type": "audio", "content": clip}
        feats = None if encoded.features is None else {**self._features, **encoded.features}
        audio = pipeline.EncodedAudio({**self._codes, **encoded.codes}, feats)
        history, trimmed = (list(self.messages) if memory else []), 0
        while True:
            messages = [*history, user]
            (prompt,) = pipeline.build_prompts(self.kimia.prompt_builder, [messages], output, audio)
            if not history or len(prompt) + self.reserve <= self.capacity:
                return Built(prompt, messages, trimmed, encoded)
            history = history[_first_exchange(history) :]
            trimmed += 1

    def commit(self, built: Built) -> None:
        """The session remembers the built prompt's messages (dropped turns are forgotten)."""
        self.messages = list(built.messages)
        clips = {pipeline.clip_key(m["content"]) for m in self.messages if m["role"] == "user"}
        codes = {**self._codes, **built.encoded.codes}
        self._codes = {k: v for k, v in codes.items() if k in clips}
        if built.encoded.features is not None:
            feats = {**self._features, **built.encoded.features}
            self._features = {k: v for k, v in feats.items() if k in clips}

    def reply_message(
        self, text: str, audio_ids: list[int] | None, output: OutputType
    ) -> Message | None:
        """The assistant message of a reply: "audio-text" (its semantic codes and transcript)
        for a spoken reply the builder can lay out, else "text"; None for an empty reply."""
        kimia = self.kimia
        off = kimia.kimia_token_offset
        codes = [a for a in audio_ids or () if a >= off]
        builder = kimia.prompt_builder
        if (
            output == OutputType.BOTH
            and codes
            and text
            and "audio-text" in MESSAGE_TYPES[builder.version]
            and len(builder.text_encode_fn(text)) <= AUDIO_DELAY + len(codes)
        ):
            return {
                "role": "assistant",
                "message_type": "audio-text",
                "content": (None, text),
                "audio_tokens": np.asarray(codes, np.int64),
            }
        if not text:
            return None
        return {"role": "assistant", "message_type": "text", "content": text}

    def add_reply(
        self, text: str, audio_ids: list[int] | None, output: OutputType, epoch: int
    ) -> None:
        """Remembers a reply (a cancelled one with the text sent so far), unless reset since."""
        m = self.reply_message(text, audio_ids, output)
        if m is not None and epoch == self.epoch:
            self.messages.append(m)


@dataclasses.dataclass(eq=False)
class _Reply:
    turn: int
    req: Request | None = None
    cancelled: bool = False
    text: str = ""  # text forwarded to the client
    task: asyncio.Task | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.req is not None:
            self.req.cancel()


class RealtimeSession:
    """One WebSocket connection (protocol in `serving/server.py`)."""

    def __init__(
        self, ws: WebSocket, kimia: Any, engine: Engine, output: OutputType, reply_tokens: int
    ):
        self.ws, self.kimia, self.engine, self.output = ws, kimia, engine, output
        self.vad = EnergyVad(VadConfig())
        self.barge_in, self.memory = True, True
        self.sampling = Sampling()
        self.conv = Conversation(kimia, engine.config.capacity, reply_tokens)
        self.replies: list[_Reply] = []  # not yet finished, in turn order
        self.turns = 0
        self._lock = asyncio.Lock()

    async def send(self, obj: dict[str, Any] | bytes, reply: _Reply | None = None) -> bool:
        """Sends one message (nothing for a cancelled `reply`); False when not sent."""
        async with self._lock:
            if reply is not None and reply.cancelled:
                return False
            try:
                if isinstance(obj, bytes):
                    await self.ws.send_bytes(obj)
                else:
                    await self.ws.send_json(obj)
            except Exception:  # noqa: BLE001 - the client went away; the receive loop ends
                return False
            return True

    async def error(self, message: str, **extra: Any) -> None:
        await self.send({"type": "error", "message": message, **extra})

    def settings(self) -> dict[str, Any]:
        return {
            "vad": dataclasses.asdict(self.vad.config),
            "output": self.output.value,
            "barge_in": self.barge_in,
            "memory": self.memory,
            "reply_tokens": self.conv.reply_tokens,
            "sampling": dataclasses.asdict(self.sampling),
        }

    async def run(self) -> None:
        await self.send(
            {
                "type": "session.ready",
                "input_sample_rate": self.vad.config.sample_rate,
                "output_sample_rate": oa.OUTPUT_SAMPLE_RATE,
                "capacity": self.conv.capacity,
                **self.settings(),
            }
        )
        try:
            while True:
                msg = await self.ws.receive()
                if msg.get("type") == "websocket.disconnect":
                    return
                turn = None
                if msg.get("bytes") is not None:
                    b = msg["bytes"]
                    if len(b) % 2:
                        await self.error(
                            "audio frames must be 16-bit little-endian PCM (an even byte count)"
                        )
                        continue
                    turn = self.vad.push(np.frombuffer(b, "<i2").astype(np.float32) / 32768.0)
                    if self.vad.onset:
                        await self._onset()
                elif msg.get("text") is not None:
                    turn = await self._control(msg["text"])
                if turn is not None:
                    await self._turn_end(turn)
        except WebSocketDisconnect:
            return
        finally:
            for r in self.replies:
                r.cancel()
                if r.task is not None:
                    r.task.cancel()

    async def _control(self, raw: str) -> np.ndarray | None:
        try:
            ctl = json.loads(raw)
            kind = ctl["type"]
        except (json.JSONDecodeError, KeyError, TypeError):
            await self.error('control messages are JSON objects with a "type"')
            return None
        if kind == "session.update":
            try:
                vad = EnergyVad(VadConfig(**ctl["vad"])) if "vad" in ctl else self.vad
                output = OutputType.parse(ctl.get("output", self.output))
                sampling = dataclasses.replace(self.sampling, **ctl.get("sampling", {}))
                flags = {k: ctl.get(k, getattr(self, k)) for k in ("barge_in", "memory")}
                for k, v in flags.items():
                    if not isinstance(v, bool):
                        raise ValueError(f"{k} must be true or false, got {v!r}")
                reply_tokens = ctl.get("reply_tokens", self.conv.reply_tokens)
                if isinstance(reply_tokens, bool) or not isinstance(reply_tokens, int):
                    raise ValueError(f"reply_tokens must be an integer, got {reply_tokens!r}")
                if reply_tokens < 1:
                    raise ValueError(f"reply_tokens must be >= 1, got {reply_tokens}")
            except (TypeError, ValueError, KimiaError) as e:
                await self.error(f"session.update: {e}")
                return None
            if output == OutputType.BOTH and self.engine.detokenizer is None:
                await self.error('session.update: output "both" needs the detokenizer')
                return None
            self.vad, self.output, self.sampling = vad, output, sampling
            self.barge_in, self.memory = flags["barge_in"], flags["memory"]
            self.conv.reply_tokens = reply_tokens
            await self.send({"type": "session.updated", **self.settings()})
        elif kind == "input.end":
            turn = self.vad.end()
            if turn is None:
                await self.error("no speech heard")
            return turn
        elif kind == "response.cancel":
            await self._cancel_all("client")
        elif kind == "session.reset":
            self.conv.reset()
            await self.send({"type": "session.history", "reset": True, "messages": 0, "trimmed": 0})
        else:
            await self.error(f"unknown type {kind!r}")
        return None

    async def _cancel_all(self, reason: str) -> None:
        for r in list(self.replies):  # a finishing task removes itself meanwhile
            if not r.cancelled:
                r.cancel()
                await self.send(
                    {"type": "response.cancelled", "turn": r.turn, "reason": reason, "text": r.text}
                )

    async def _onset(self) -> None:
        await self.send({"type": "speech.started", "barge_in": self.barge_in})
        if self.barge_in:
            await self._cancel_all("barge_in")

    async def _turn_end(self, turn: np.ndarray) -> None:
        sr = self.vad.config.sample_rate
        self.turns += 1
        reply = _Reply(self.turns)
        await self.send(
            {"type": "turn.end", "turn": reply.turn, "seconds": round(len(turn) / sr, 3)}
        )
        prev = self.replies[-1].task if self.replies else None
        self.replies.append(reply)
        reply.task = asyncio.create_task(
            self._respond(reply, turn, sr, self.output, self.sampling, self.memory, prev)
        )

    async def _respond(
        self,
        reply: _Reply,
        turn: np.ndarray,
        sr: int,
        output: OutputType,
        sampling: Sampling,
        memory: bool,
        prev: asyncio.Task | None,
    ) -> None:
        try:
            try:
                clip, encoded = await run_in_threadpool(self.conv.encode, turn, sr)
            except KimiaError as e:
                await self.error(f"{type(e).__name__}: {e}", turn=reply.turn)
                return
            if prev is not None:
                await asyncio.wait([prev])  # one reply at a time, in turn order
            try:
                built = self.conv.build(clip, encoded, output, memory)
            except KimiaError as e:
                await self.error(f"{type(e).__name__}: {e}", turn=reply.turn)
                return
            if memory:
                self.conv.commit(built)  # the user's turn is remembered even if not answered
            await self.send(
                {
                    "type": "session.history",
                    "turn": reply.turn,
                    "messages": len(built.messages),
                    "prompt_tokens": len(built.prompt),
                    "trimmed": built.trimmed,
                    "capacity": self.conv.capacity,
                    "reply_tokens": self.conv.reserve,
                }
            )
            if reply.cancelled:
                return
            epoch = self.conv.epoch
            try:
                reply.req = self.engine.submit(built.prompt, output, sampling, 0)
            except EngineBusy as e:
                await self.error(str(e), turn=reply.turn, retry_after=e.retry_after)
                return
            except KimiaError as e:
                await self.error(f"{type(e).__name__}: {e}", turn=reply.turn)
                return
            while True:
                ev = await next_event(reply.req)
                if ev.get("done"):
                    break
                if ev.get("text") and await self.send(
                    {"type": "response.text", "turn": reply.turn, "text": ev["text"]}, reply
                ):
                    reply.text += ev["text"]
                if ev.get("audio") is not None:
                    await self.send(oa.pcm16(ev["audio"]), reply)
            if memory:
                if reply.cancelled:  # keep what the client got
                    self.conv.add_reply(reply.text, None, output, epoch)
                else:
                    tokens = ev.get("tokens") or ([], [])
                    self.conv.add_reply(ev.get("text", ""), tokens[0], output, epoch)
            await self.send(
                {
                    "type": "response.done",
                    "turn": reply.turn,
                    "text": ev.get("text", ""),
                    "reason": ev.get("reason"),
                    **({"error": ev["error"]} if ev.get("error") else {}),
                },
                reply,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one reply fails, the session goes on
            logging.exception("real-time reply failed")
            await self.error(f"reply failed: {type(e).__name__}: {e}", turn=reply.turn)
        finally:
            if reply.req is not None:
                reply.req.cancel()  # no-op once finished
            if reply in self.replies:
                self.replies.remove(reply)

"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    POST /v1/audio/transcriptions   multipart: file, model, language, prompt, response_format
    POST /v1/chat/completions       messages with text / input_audio parts, modalities, stream
    GET  /v1/models, /health, /metrics (Prometheus text)
    WS   /v1/realtime               microphone chunks in, text + 24 kHz audio chunks out
    GET  /                          the real-time conversation page

    app = create_app(kimia, engine, ServerConfig(model_names=("kimi-audio",)))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # or experiments/serve.py

The official `openai` client works unchanged against `base_url=http://127.0.0.1:8000/v1`. Bad
requests get a 4xx with an OpenAI-style error body naming the field; a full engine queue gets 429
with `Retry-After`; the server keeps serving the others.

Real-time protocol (`WS /v1/realtime`, session in `serving/realtime.py`). Client -> server:
    binary frames                 16-bit little-endian mono PCM at `input_sample_rate` (16 kHz)
    {"type": "session.update", "vad": {VadConfig fields}, "output": "text"|"both",
     "barge_in": bool, "memory": bool, "reply_tokens": int, "sampling": {Sampling fields}}
                                  any subset; answered by session.updated (all settings)
    {"type": "input.end"}         end the turn now (push-to-talk)
    {"type": "response.cancel"}   cancel the running reply (answered by response.cancelled)
    {"type": "session.reset"}     forget the conversation (answered by session.history, reset)
Server -> client (every reply message carries its `turn` number):
    {"type": "session.ready", "input_sample_rate", "output_sample_rate", "capacity", settings}
    {"type": "speech.started", "barge_in"}    speech onset (the page stops its audio if barge_in)
    {"type": "turn.end", "turn", "seconds"}    the VAD (or input.end) ended a user turn
    {"type": "session.history", "turn", "messages", "prompt_tokens", "trimmed", "capacity",
     "reply_tokens"}                           the turn's prompt: messages remembered, the oldest
                                               exchanges dropped to fit the slot; {"reset": true}
    {"type": "response.text", "turn", "text"}  a text piece; binary frames: 16-bit 24 kHz PCM
    {"type": "response.done", "turn", "text", "reason"[, "error"]}
    {"type": "response.cancelled", "turn", "reason": "barge_in"|"client", "text"}  the text
                                               sent before the cancel (what memory keeps)
    {"type": "error", "message"[, "turn", "retry_after"]}   the session goes on
Frames are read while a reply streams; replies run one at a time in turn order. With barge-in
(default) speech onset during a reply cancels it. With memory (default) each prompt holds the
conversation so far (user audio turns, replies as text or "audio-text" messages).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client as prom
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimia_jax.configs import OutputType
from kimia_jax.errors import KimiaError
from kimia_jax.inference.batch import task_messages
from kimia_jax.inference.sampler import Sampling
from kimia_jax.serving import openai_api as oa
from kimia_jax.serving.engine import Engine, EngineBusy
from kimia_jax.serving.realtime import RealtimeSession, next_event

PAGE = Path(__file__).with_name("static") / "realtime.html"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Attributes:
    model_names: the `model` values accepted (the first is reported by /v1/models).
    max_upload_bytes: largest request body (413 above it).
    realtime_output: output type of the real-time endpoint ("both" needs the detokenizer).
    realtime_reply_tokens: positions of a slot kept free for a real-time reply when the
      conversation's oldest turns are trimmed (at most half the slot; `session.update` sets it).
    """

    model_names: tuple[str, ...] = ("kimi-audio",)
    max_upload_bytes: int = 25 * 1024 * 1024
    realtime_output: str = "both"
    realtime_reply_tokens: int = 256


def _error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return JSONResponse(oa.error_body(message, kind, param, code), status, headers=headers)


def _require_content_type(request: Request, kind: str) -> None:
    """415 unless the request body is `kind` (e.g. "application/json")."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(kind):
        raise oa.BadRequest(
            f"content type must be {kind}, got {ctype!r}", status=415, param="content-type"
        )


def create_app(kimia: Any, engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; `kimia` (a loaded `KimiAudio`) builds prompts, `engine` (started by the
    app's lifespan if not yet running) generates."""
    cfg = config or ServerConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield

    app = FastAPI(title="kimia_jax", lifespan=lifespan)
    app.state.engine, app.state.kimia, app.state.config = engine, kimia, cfg

    # -- errors: OpenAI-shaped 4xx bodies ------------------------------------------------------

    @app.exception_handler(oa.BadRequest)
    async def _bad(_: Request, e: oa.BadRequest) -> JSONResponse:
        return _error(e.status, str(e), e.param, e.code)

    @app.exception_handler(EngineBusy)
    async def _busy(_: Request, e: EngineBusy) -> JSONResponse:
        return _error(429, str(e), code="busy", headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(KimiaError)
    async def _kimia(_: Request, e: KimiaError) -> JSONResponse:
        return _error(400, f"{type(e).__name__}: {e}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.middleware("http")
    async def _limit_size(request: Request, call_next: Any) -> Response:
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > cfg.max_upload_bytes:
            return _error(
                413,
                f"the request body of {int(n)} bytes exceeds the limit of "
                f"{cfg.max_upload_bytes} bytes",
                code="too_large",
            )
        return await call_next(request)

    # -- helpers --------------------------------------------------------------------------------

    def build_prompt(messages: list[dict[str, Any]], output_type: OutputType) -> Any:
        (prompt,) = kimia.prompts([messages], output_type)
        return prompt

    async def submit(messages, output_type, sampling, seed):  # noqa: ANN001, ANN202
        prompt = await run_in_threadpool(build_prompt, messages, output_type)
        req = engine.submit(prompt, output_type, sampling, seed)
        return req, len(prompt)

    async def result(req: Any) -> dict[str, Any]:
        audio, final = [], {}
        try:
            while True:
                ev = await next_event(req)
                if ev.get("audio") is not None:
                    audio.append(ev["audio"])
                if ev.get("done"):
                    final = dict(ev)
                    break
        except BaseException:
            req.cancel()
            raise
        final["audio"] = np.concatenate(audio) if audio else None
        if final.get("reason") not in ("stop", "length"):
            raise oa.BadRequest(
                f"generation ended: {final.get('reason')} {final.get('error')}",
                status=500 if final.get("reason") == "error" else 408,
            )
        return final

    # -- endpoints ------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "slots": engine.config.slots,
            "active": engine.active_slots,
            "queued": engine.queue_length,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.text(), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "kimia_jax"}
                for m in cfg.model_names
            ],
        }

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        _require_content_type(request, "multipart/form-data")
        try:
            form = await request.form(max_part_size=cfg.max_upload_bytes)
        except Exception as e:  # noqa: BLE001 - multipart parser errors
            raise oa.BadRequest(f"malformed multipart body: {e}") from None
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise oa.BadRequest("file is required (an audio file part)", param="file")
        model = form.get("model")
        if model not in cfg.model_names:
            raise oa.BadRequest(
                f"model {model!r} is not served here; use one of {list(cfg.model_names)}",
                404,
                "model",
                "model_not_found",
            )
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text", "verbose_json"):
            raise oa.BadRequest(
                f"response_format must be json, text or verbose_json, got {fmt!r}",
                param="response_format",
            )
        language = form.get("language") or None
        data = await file.read()
        wav, sr = oa.decode_audio_bytes(data, "file")
        temp = form.get("temperature")
        try:
            sampling = Sampling(text_temperature=float(temp)) if temp else Sampling()
        except (ValueError, KimiaError) as e:
            raise oa.BadRequest(f"temperature: {e}", param="temperature") from None
        # the official ASR instruction (or the request's `prompt`); `language` is only echoed
        messages = task_messages("asr", (wav, sr), form.get("prompt") or None)
        req, _ = await submit(messages, OutputType.TEXT, sampling, 0)
        out = await result(req)
        text = out["text"]
        if fmt == "text":
            return PlainTextResponse(text)
        if fmt == "verbose_json":
            dur = float(len(wav) / sr) if wav.ndim == 1 else float(wav.shape[0] / sr)
            return JSONResponse(
                {
                    "task": "transcribe",
                    "language": language or "unknown",
                    "duration": dur,
                    "text": text,
                    "segments": [],
                    "words": [],
                }
            )
        return JSONResponse({"text": text})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        _require_content_type(request, "application/json")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise oa.BadRequest(f"malformed JSON body: {e}") from None
        creq = oa.parse_chat(body, cfg.model_names)
        req, n_prompt = await submit(creq.messages, creq.output_type, creq.sampling, creq.seed)
        if not creq.stream:
            out = await result(req)
            return JSONResponse(oa.chat_response(creq, out, n_prompt))
        return StreamingResponse(stream_chat(creq, req, n_prompt), media_type="text/event-stream")

    async def stream_chat(creq: oa.ChatRequest, req: Any, n_prompt: int) -> AsyncIterator[str]:
        cid, audio_id = oa.new_id("chatcmpl"), oa.new_id("audio")
        both = creq.output_type == OutputType.BOTH

        def sse(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            yield sse(oa.chunk(cid, creq.model, {"role": "assistant", "content": ""}))
            while True:
                ev = await next_event(req)
                if ev.get("done"):
                    if ev.get("reason") not in ("stop", "length"):
                        yield sse(
                            oa.error_body(
                                f"generation ended: {ev.get('reason')} {ev.get('error') or ''}",
                                "server_error",
                            )
                        )
                        break
                    finish = "length" if ev["reason"] == "length" else "stop"
                    yield sse(
                        oa.chunk(
                            cid,
                            creq.model,
                            {},
                            finish,
                            {"usage": oa.usage(n_prompt, int(ev.get("steps") or 0))},
                        )
                    )
                    break
                if ev.get("text"):
                    delta = (
                        {"audio": {"id": audio_id, "transcript": ev["text"]}}
                        if both
                        else {"content": ev["text"]}
                    )
                    yield sse(oa.chunk(cid, creq.model, delta))
                if ev.get("audio") is not None:
                    data = base64.b64encode(oa.pcm16(ev["audio"])).decode("ascii")
                    yield sse(oa.chunk(cid, creq.model, {"audio": {"id": audio_id, "data": data}}))
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # no-op once finished; frees the slot when the client went away

    # -- real-time conversation ----------------------------------------------------------------

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        output = OutputType.parse(cfg.realtime_output)
        if output == OutputType.BOTH and engine.detokenizer is None:
            output = OutputType.TEXT
        await RealtimeSession(ws, kimia, engine, output, cfg.realtime_reply_tokens).run()

    return app


class BackgroundServer:
    """uvicorn on 127.0.0.1 in a thread (tests, benchmarks): `with BackgroundServer(app) as s:`
    ... `s.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", ws="websockets-sansio"
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive() or time.time() - t0 > 60:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

"""OpenAI request/response shapes <-> Kimi-Audio chats and engine events (no web framework here).

Chat messages: `content` is a string or a list of parts `{"type": "text", "text"}` /
`{"type": "input_audio", "input_audio": {"data": base64, "format": "wav" | "mp3" | ...}}`; each
part becomes one Kimi message (`message_type` "text" / "audio") of the same role. Kimi-Audio has no
system role: "system" / "developer" messages are given as user text. `modalities` containing
"audio" selects output_type "both". Audio out: a base64 16-bit wav at 24 kHz (whole replies) or
base64 16-bit PCM at 24 kHz chunks (streams), as OpenAI's `audio` output.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from kimia_jax.configs import OutputType
from kimia_jax.errors import KimiaError, SamplingError
from kimia_jax.inference.sampler import Sampling

OUTPUT_SAMPLE_RATE = 24000


class BadRequest(KimiaError):
    """A request the server answers with 4xx; `status` and `param` go into the error body."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def decode_audio_bytes(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """(float32 samples, sample rate) of an uploaded file; BadRequest when it does not decode."""
    import soundfile as sf

    if not data:
        raise BadRequest(f"{what}: the audio is empty (0 bytes)", param=what)
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types
        raise BadRequest(
            f"{what}: the audio could not be decoded ({type(e).__name__}: {e}); send wav, flac "
            "or ogg",
            param=what,
        ) from None
    if wav.size == 0:
        raise BadRequest(f"{what}: the audio has no samples", param=what)
    if not np.isfinite(wav).all():
        raise BadRequest(f"{what}: the audio has NaN or inf samples", param=what)
    return wav, int(sr)


def wav_bytes(samples: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def pcm16(samples: np.ndarray) -> bytes:
    """Little-endian 16-bit PCM of float samples in [-1, 1] (clipped)."""
    x = np.clip(np.asarray(samples, np.float32), -1.0, 1.0)
    return (x * 32767.0).round().astype("<i2").tobytes()


def _check(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise BadRequest(message, param=param)


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI `messages` -> Kimi messages (audio parts decoded to (samples, rate) tuples)."""
    _check(
        isinstance(messages, list) and len(messages) > 0,
        "messages must be a non-empty list",
        "messages",
    )
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        _check(isinstance(m, Mapping), f"{where} must be an object", where)
        role = m.get("role")
        _check(
            role in ("system", "developer", "user", "assistant"),
            f"{where}.role must be system, developer, user or assistant, got {role!r}",
            f"{where}.role",
        )
        kimi_role = "assistant" if role == "assistant" else "user"
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": kimi_role, "message_type": "text", "content": content})
            continue
        _check(
            isinstance(content, list) and len(content) > 0,
            f"{where}.content must be a string or a non-empty list of parts",
            f"{where}.content",
        )
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            _check(isinstance(part, Mapping), f"{pw} must be an object", pw)
            kind = part.get("type")
            if kind == "text":
                _check(isinstance(part.get("text"), str), f"{pw}.text must be a string", pw)
                out.append({"role": kimi_role, "message_type": "text", "content": part["text"]})
            elif kind == "input_audio":
                a = part.get("input_audio")
                _check(
                    isinstance(a, Mapping) and isinstance(a.get("data"), str),
                    f"{pw}.input_audio.data must be a base64 string",
                    pw,
                )
                try:
                    raw = base64.b64decode(a["data"], validate=True)
                except (binascii.Error, ValueError):
                    raise BadRequest(
                        f"{pw}.input_audio.data is not valid base64", param=pw
                    ) from None
                out.append(
                    {
                        "role": kimi_role,
                        "message_type": "audio",
                        "content": decode_audio_bytes(raw, f"{pw}.input_audio"),
                    }
                )
            else:
                raise BadRequest(
                    f"{pw}.type must be 'text' or 'input_audio', got {kind!r}", param=pw
                )
    return out


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    output_type: OutputType
    sampling: Sampling
    seed: int
    stream: bool
    model: str


def parse_chat(body: Any, models: tuple[str, ...]) -> ChatRequest:
    """Validates a /v1/chat/completions body (BadRequest naming the field otherwise)."""
    _check(isinstance(body, Mapping), "the body must be a JSON object", "body")
    model = body.get("model")
    _check(isinstance(model, str), "model is required (a string)", "model")
    if model not in models:
        raise BadRequest(
            f"model {model!r} is not served here; use one of {list(models)}",
            status=404,
            param="model",
            code="model_not_found",
        )
    mods = body.get("modalities") or ["text"]
    _check(
        isinstance(mods, list) and set(mods) <= {"text", "audio"},
        f"modalities must be a list of 'text' / 'audio', got {mods!r}",
        "modalities",
    )
    audio = body.get("audio")
    if audio is not None:
        _check(isinstance(audio, Mapping), "audio must be an object", "audio")
        fmt = audio.get("format", "wav")
        _check(
            fmt in ("wav", "pcm16"),
            f"audio.format must be 'wav' or 'pcm16', got {fmt!r}",
            "audio.format",
        )
    kw: dict[str, Any] = {}
    for name in Sampling.names():  # the official sampling arguments, e.g. via extra_body
        if name in body:
            kw[name] = body[name]
    if body.get("temperature") is not None:
        kw.setdefault("text_temperature", body["temperature"])
    n = body.get("max_completion_tokens", body.get("max_tokens"))
    if n is not None:
        kw.setdefault("max_new_tokens", n)
    for k in ("text_temperature", "audio_temperature"):
        if isinstance(kw.get(k), int) and not isinstance(kw.get(k), bool):
            kw[k] = float(kw[k])
    try:
        sampling = Sampling(**kw)
    except (SamplingError, TypeError) as e:
        raise BadRequest(str(e), param="sampling") from None
    seed = body.get("seed", 0)
    _check(
        isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
        f"seed must be an integer >= 0, got {seed!r}",
        "seed",
    )
    stream = body.get("stream", False)
    _check(isinstance(stream, bool), "stream must be true or false", "stream")
    return ChatRequest(
        messages=chat_messages(body.get("messages")),
        output_type=OutputType.BOTH if "audio" in mods else OutputType.TEXT,
        sampling=sampling,
        seed=seed,
        stream=stream,
        model=model,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(req: ChatRequest, result: Mapping[str, Any], prompt_tokens: int) -> dict:
    """A `chat.completion` object from an engine result."""
    text = result.get("text") or ""
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if req.output_type == OutputType.BOTH:
        samples = result.get("audio")
        samples = np.zeros((0,), np.float32) if samples is None else samples
        msg["content"] = None  # as OpenAI: the words are the audio's transcript
        msg["audio"] = {
            "id": new_id("audio"),
            "data": base64.b64encode(wav_bytes(samples)).decode("ascii"),
            "expires_at": int(time.time()) + 3600,
            "transcript": text,
        }
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "message": msg,
                "finish_reason": "length" if result.get("reason") == "length" else "stop",
            }
        ],
        "usage": usage(prompt_tokens, int(result.get("steps") or 0)),
    }


def chunk(
    cid: str,
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if extra:
        out.update(extra)
    return out

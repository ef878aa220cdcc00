"""Serve Kimi-Audio over HTTP: an OpenAI-compatible API + a real-time conversation page.

    python -m experiments.serve --model_path /data/Kimi-Audio-7B-Instruct --slots 8
    # then, unchanged OpenAI clients:
    #   openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    # and the page: http://127.0.0.1:8000/

Endpoints (kimia_jax/serving/server.py): POST /v1/audio/transcriptions, POST
/v1/chat/completions (input_audio parts, modalities ["text", "audio"], stream), GET /v1/models,
/health, /metrics, WS /v1/realtime, GET / (the page). Listens on 127.0.0.1 unless --host says
otherwise. --slots 1 serves one request at a time (the official behaviour), for comparisons.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model_path", None, "Released or converted model folder.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. data=1,fsdp=1,tensor=8.")
_GLM = flags.DEFINE_string("glm_tokenizer", None, "GLM-4-Voice tokenizer folder.")
_NAMES = flags.DEFINE_list("model_name", ["kimi-audio"], "`model` values the API accepts.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Concurrent requests (decode slots).", lower_bound=1)
_CAPACITY = flags.DEFINE_integer(
    "capacity", 2048, "KV positions per slot (prompt + reply).", lower_bound=64
)
_CHUNK = flags.DEFINE_integer("prefill_chunk", 128, "Prompt positions per prefill call.")
_TICK = flags.DEFINE_integer("steps_per_tick", 8, "Decode steps between scheduling points.")
_QUEUE = flags.DEFINE_integer("max_queue", 64, "Waiting requests before answering 429.")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 300.0, "Per-request time limit.")
_DETOK_SCHEDULE = flags.DEFINE_enum(
    "detok_schedule",
    "first_chunk",
    ["first_chunk", "fifo"],
    "Which spoken reply's audio chunk the detokenizer decodes next: first chunks first, then "
    "earliest playback deadline; or arrival order.",
)
_DETOK_WORKERS = flags.DEFINE_integer(
    "detok_workers", 1, "Detokenizer threads (one reply each at a time).", lower_bound=1
)
_UPLOAD = flags.DEFINE_integer("max_upload_mb", 25, "Largest request body.", lower_bound=1)
_QUANT = flags.DEFINE_enum(
    "quantize", None, ["none", "int8", "int4"],
    "Weight-only quantization of the LLM on load (unset: as the model folder stores it).",
)  # fmt: skip
_VOICE = flags.DEFINE_string(
    "voice_prompt",
    None,
    "Reference clip whose voice every spoken reply takes (detokenizer prefill).",
)
_NO_DETOK = flags.DEFINE_bool("text_only", False, "Skip the detokenizer (no audio output).")
_REALTIME = flags.DEFINE_enum(
    "realtime_output", "both", ["both", "text"], "What the real-time endpoint answers with."
)
_REPLY_TOKENS = flags.DEFINE_integer(
    "realtime_reply_tokens",
    256,
    "Slot positions kept free for a real-time reply: older turns are dropped from the "
    "conversation's memory beyond that (at most half of --capacity).",
    lower_bound=1,
)


def build_app():  # noqa: ANN201 - FastAPI is imported lazily
    from kimia_jax import sharding
    from kimia_jax.inference.api import KimiAudio
    from kimia_jax.serving.engine import Engine, EngineConfig
    from kimia_jax.serving.server import ServerConfig, create_app

    root = Path(_MODEL.value)
    if not root.is_dir():
        raise app.UsageError(f"--model_path {root} is not a folder")
    mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
    engine_cfg = EngineConfig(
        slots=_SLOTS.value,
        capacity=_CAPACITY.value,
        prefill_chunk=_CHUNK.value,
        steps_per_tick=_TICK.value,
        max_queue=_QUEUE.value,
        request_timeout_s=_TIMEOUT.value,
        detok_schedule=_DETOK_SCHEDULE.value,
        detok_workers=_DETOK_WORKERS.value,
    )
    kimia = KimiAudio(
        root,
        load_detokenizer=not _NO_DETOK.value,
        dtype=_DTYPE.value,
        mesh=mesh,
        glm_tokenizer_path=_GLM.value,
        quantize=_QUANT.value,
    )
    if _VOICE.value and _NO_DETOK.value:
        raise app.UsageError("--voice_prompt sets the voice of spoken replies: drop --text_only")
    engine = Engine.from_kimia(kimia, engine_cfg, voice_prompt=_VOICE.value)
    server_cfg = ServerConfig(
        model_names=tuple(_NAMES.value),
        max_upload_bytes=_UPLOAD.value << 20,
        realtime_output="text" if _NO_DETOK.value else _REALTIME.value,
        realtime_reply_tokens=_REPLY_TOKENS.value,
    )
    return create_app(kimia, engine, server_cfg)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL.value:
        raise app.UsageError("--model_path is required")
    import uvicorn

    application = build_app()
    logging.info("serving on http://%s:%d", _HOST.value, _PORT.value)
    uvicorn.run(application, host=_HOST.value, port=_PORT.value, log_level="info")


if __name__ == "__main__":
    app.run(main)

"""Load test of the OpenAI-compatible server, localhost only, bounded in count and time.

    python -m tools.bench_serve                         # tiny random checkpoint, CPU-sized
    python -m tools.bench_serve --model_path /data/Kimi-Audio-7B-Instruct --slots 16 \
        --requests 64 --max_seconds 300

One process loads the model once and starts, on 127.0.0.1 over the same weights, one server per
--detok variant (the continuous-batching engine with --slots slots and that detokenizer schedule
/ worker count, `EngineConfig.detok_schedule` / `detok_workers`) and the same server restricted
to one slot (one request at a time, the official behaviour). At each concurrency level
(--levels), each server in turn gets that many clients sending streamed chats (`stream: true`)
back to back until --requests replies are in or --max_seconds have passed (servers interleaved
per level, so a loaded machine's drift hits them alike); reported per server and level: replies,
decode steps/s and seconds of speech received per second over the level's wall time, p50 / p99
time to the first text delta and to the first audio chunk (client side, from sending the
request). Results go to stdout and, with --out, a JSON file.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("model_path", None, "Model folder (default: a tiny random one).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Compute dtype.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Slots of the batching server.", lower_bound=2)
_CAPACITY = flags.DEFINE_integer("capacity", 512, "KV positions per slot.")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 64, "Prompt positions per prefill call.")
_TICK = flags.DEFINE_integer("steps_per_tick", 8, "Decode steps between scheduling points.")
_LEVELS = flags.DEFINE_list("levels", ["1", "4", "16"], "Concurrency levels.")
_REQUESTS = flags.DEFINE_integer("requests", 16, "Replies per level and server.", lower_bound=1)
_MAX_S = flags.DEFINE_float("max_seconds", 120.0, "Time limit per level and server.")
_AUDIO = flags.DEFINE_bool("audio", True, 'Ask for speech (modalities ["text", "audio"]).')
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Text-only replies: step budget.")
_PROMPT = flags.DEFINE_string("prompt", "Tell me a story.", "The user message.")
_DETOK = flags.DEFINE_list(
    "detok",
    ["first_chunk", "fifo"],
    "Detokenizer variants of the batching server: SCHEDULE or SCHEDULE:WORKERS "
    "(EngineConfig.detok_schedule / detok_workers).",
)
_SPEECH = flags.DEFINE_bool(
    "speech_heavy",
    True,
    "Tiny checkpoint only: zero its audio head's rows of the non-semantic ids (below "
    "kimia_token_offset), so every audio step is a semantic code, as with the released model "
    "(12.5 codes per second of speech). The random tiny model otherwise speaks ~1 code per 16 "
    "steps: one detokenizer chunk per 496-step reply, and no detokenizer load to measure.",
)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def one_request(host: str, port: int, body: bytes) -> dict[str, float]:
    """One streamed chat: times (s) to the first text delta and first audio chunk, steps,
    seconds of 24 kHz pcm16 speech received."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first_text = first_audio = None
    steps, audio_bytes = 0, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            raise RuntimeError(ev["error"]["message"])
        if ev.get("usage"):
            steps = ev["usage"]["completion_tokens"]
        delta = ev["choices"][0]["delta"] if ev.get("choices") else {}
        now = time.perf_counter() - t0
        audio = delta.get("audio") or {}
        if first_text is None and (delta.get("content") or audio.get("transcript")):
            first_text = now
        if audio.get("data"):
            audio_bytes += len(base64.b64decode(audio["data"]))
            if first_audio is None:
                first_audio = now
    c.close()
    return {
        "first_text": first_text,
        "first_audio": first_audio,
        "steps": steps,
        "audio_s": audio_bytes / 2 / 24000,
        "total": time.perf_counter() - t0,
    }


def run_level(host: str, port: int, body: bytes, clients: int, n: int, limit: float) -> dict:
    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    started = 0

    def worker() -> None:
        nonlocal started
        while True:
            with lock:
                if started >= n or time.perf_counter() - t0 > limit:
                    return
                started += 1
            try:
                res = one_request(host, port, body)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append(res)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def pct(key: str, q: float) -> float | None:
        xs = [r[key] for r in results if r[key] is not None]
        return round(float(np.percentile(xs, q)), 3) if xs else None

    return {
        "clients": clients,
        "replies": len(results),
        "errors": len(errors),
        "wall_s": round(wall, 2),
        "steps_per_s": round(sum(r["steps"] for r in results) / wall, 1),
        "audio_s_per_s": round(sum(r["audio_s"] for r in results) / wall, 2),
        "ttft_p50": pct("first_text", 50),
        "ttft_p99": pct("first_text", 99),
        "first_audio_p50": pct("first_audio", 50),
        "first_audio_p99": pct("first_audio", 99),
    }


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.inference.api import KimiAudio
    from kimia_jax.serving.engine import Engine, EngineConfig
    from kimia_jax.serving.server import BackgroundServer, ServerConfig, create_app

    if _MODEL.value:
        root = Path(_MODEL.value)
    else:
        from kimia_jax.testing import tiny_kimia

        root = tiny_kimia.write(Path(tempfile.mkdtemp()) / "tiny-kimia")
    kimia = KimiAudio(root, load_detokenizer=_AUDIO.value, dtype=_DTYPE.value)
    if _SPEECH.value and not _MODEL.value:
        w = kimia.params["mimo_output"]["weight"]
        kimia.params["mimo_output"]["weight"] = w.at[: kimia.cfg.kimia_token_offset].set(0)
    body = {
        "model": "kimi-audio",
        "messages": [{"role": "user", "content": _PROMPT.value}],
        "stream": True,
    }
    if _AUDIO.value:
        body.update(modalities=["text", "audio"], audio={"voice": "default", "format": "pcm16"})
    else:
        body["max_tokens"] = _MAX_TOKENS.value
    data = json.dumps(body).encode()
    levels = [int(x) for x in _LEVELS.value]
    variants = []  # (name, EngineConfig)
    for v in _DETOK.value:
        schedule, _, workers = v.partition(":")
        variants.append((v, _SLOTS.value, schedule, int(workers or 1)))
    variants.append(("1 slot", 1, "first_chunk", 1))
    out = {
        "model": str(root),
        "slots": _SLOTS.value,
        "audio": _AUDIO.value,
        "speech_heavy": _SPEECH.value and not _MODEL.value,
        "runs": [],
    }
    with contextlib.ExitStack() as stack:
        servers = []
        for name, slots, schedule, workers in variants:
            cfg = EngineConfig(
                slots=slots,
                capacity=_CAPACITY.value,
                prefill_chunk=_CHUNK.value,
                steps_per_tick=_TICK.value,
                max_queue=max(levels) + 1,
                detok_schedule=schedule,
                detok_workers=workers,
            )
            engine = Engine.from_kimia(kimia, cfg)
            stack.callback(engine.stop)
            s = stack.enter_context(BackgroundServer(create_app(kimia, engine, ServerConfig())))
            host, port = s.url.removeprefix("http://").split(":")
            one_request(host, int(port), data)  # compile before timing
            servers.append((name, slots, host, int(port)))
        for c in levels:
            for name, slots, host, port in servers:
                res = run_level(host, port, data, c, _REQUESTS.value, _MAX_S.value)
                res.update(server=name, server_slots=slots)
                out["runs"].append(res)
                print(json.dumps(res), flush=True)
    print(
        f"\n{'server':>14} {'slots':>5} {'conc':>4} {'replies':>7} {'steps/s':>8} "
        f"{'audio s/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'audio p50':>9} {'audio p99':>9}"
    )
    for r in out["runs"]:
        print(
            f"{r['server']:>14} {r['server_slots']:>5} {r['clients']:>4} {r['replies']:>7} "
            f"{r['steps_per_s']:>8} {r['audio_s_per_s']:>9} {r['ttft_p50']!s:>9} "
            f"{r['ttft_p99']!s:>9} {r['first_audio_p50']!s:>9} {r['first_audio_p99']!s:>9}"
        )
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)

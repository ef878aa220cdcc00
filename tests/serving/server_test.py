"""The OpenAI-compatible server on 127.0.0.1, driven by the official `openai` client, raw HTTP
(bad requests, overload) and the `websockets` client (real-time endpoint)."""

import base64
import http.client
import io
import json
import threading
import urllib.parse

import numpy as np
import openai
import pytest
import soundfile as sf

from kimia_jax.configs import OutputType
from kimia_jax.inference.batch import task_messages
from kimia_jax.inference.sampler import Sampling
from kimia_jax.serving.engine import Engine, EngineConfig
from kimia_jax.serving.server import BackgroundServer, ServerConfig, create_app
from kimia_jax.serving.vad import EnergyVad, VadConfig

MODEL = "kimi-audio"
STORY = "Tell me a story."


@pytest.fixture(scope="module")
def server(kimia, engine):
    app = create_app(kimia, engine, ServerConfig(model_names=(MODEL,), max_upload_bytes=1 << 20))
    with BackgroundServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _direct(kimia, engine, messages, output_type):
    """The same chat straight through the engine (what the server should return)."""
    (p,) = kimia.prompts([messages], output_type)
    return engine.submit(p, output_type, Sampling(), 0).result(timeout=300)


def _raw(server, method, path, body=b"", headers=None):
    u = urllib.parse.urlparse(server.url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def test_transcription_with_the_openai_client(kimia, engine, client, speech_wav):
    """json, text and verbose_json transcriptions of a wav equal the engine's own reply to the
    official ASR messages (`inference.batch.task_messages("asr", ...)`)."""
    wav, sr = sf.read(speech_wav, dtype="float32")
    want = _direct(kimia, engine, task_messages("asr", (wav, sr)), OutputType.TEXT)["text"]
    with open(speech_wav, "rb") as f:
        got = client.audio.transcriptions.create(model=MODEL, file=f, language="en")
    assert got.text == want
    with open(speech_wav, "rb") as f:
        txt = client.audio.transcriptions.create(
            model=MODEL, file=f, language="en", response_format="text"
        )
    assert isinstance(txt, str) and txt == want
    with open(speech_wav, "rb") as f:
        verbose = client.audio.transcriptions.create(
            model=MODEL, file=f, language="en", response_format="verbose_json"
        )
    assert verbose.text == want and abs(verbose.duration - 1.2) < 1e-6


def test_chat_with_audio_in_and_audio_out(kimia, engine, client, speech_wav):
    """input_audio in, modalities text+audio out: a 24 kHz 16-bit wav whose samples are the
    engine's reply to the same chat (to 16-bit rounding: measured max abs diff <= 1/32767) and
    its transcript."""
    data = base64.b64encode(speech_wav.read_bytes()).decode()
    r = client.chat.completions.create(
        model=MODEL, modalities=["text", "audio"], audio={"voice": "default", "format": "wav"},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": STORY},
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}],
    )  # fmt: skip
    wav, sr = sf.read(speech_wav, dtype="float32")
    want = _direct(kimia, engine, [
        {"role": "user", "message_type": "text", "content": STORY},
        {"role": "user", "message_type": "audio", "content": (wav, sr)},
    ], OutputType.BOTH)  # fmt: skip
    msg = r.choices[0].message
    assert msg.audio.transcript == want["text"]
    out, out_sr = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="float32")
    assert out_sr == 24000
    ref = np.zeros(0, np.float32) if want["audio"] is None else want["audio"]
    assert out.shape == ref.shape
    if ref.size:
        assert float(np.max(np.abs(out - np.clip(ref, -1, 1)))) <= 1.0 / 32767 + 1e-7
    assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_yields_text_deltas_and_audio_chunks(kimia, engine, client):
    """stream=True: text mode streams `content` deltas; text+audio streams transcript pieces and
    base64 PCM chunks which join to the engine's text and 14-code (26880-sample) reply."""
    msgs = [{"role": "user", "content": STORY}]
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=MODEL, messages=msgs, stream=True, max_tokens=20) if c.choices]  # fmt: skip
    want = _direct(kimia, engine, [{"role": "user", "message_type": "text", "content": STORY}],
                   OutputType.BOTH)  # fmt: skip
    assert "".join(p for p in pieces if p)
    transcript, pcm = [], []
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, stream=True, modalities=["text", "audio"],
        audio={"voice": "default", "format": "pcm16"},
    )  # fmt: skip
    finish = None
    for c in stream:
        if not c.choices:
            continue
        audio = getattr(c.choices[0].delta, "audio", None)
        if audio:  # openai's ChoiceDeltaAudio: id, transcript, data
            transcript.append(audio.transcript or "")
            if audio.data:
                pcm.append(np.frombuffer(base64.b64decode(audio.data), "<i2"))
        finish = c.choices[0].finish_reason or finish
    assert "".join(transcript) == want["text"] and finish in ("stop", "length")
    got = np.concatenate(pcm).astype(np.float32) / 32767
    assert got.shape == want["audio"].shape == (14 * 1920,)
    assert float(np.max(np.abs(got - np.clip(want["audio"], -1, 1)))) <= 1.0 / 32767 + 1e-7


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, speech_wav):
    js = {"Content-Type": "application/json"}
    ok_body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("wrong content type", "/v1/chat/completions", b"x=1", {"Content-Type": "text/plain"},
         415, "content type"),
        ("malformed JSON", "/v1/chat/completions", b'{"model": ', js, 400, "malformed JSON"),
        ("unknown model", "/v1/chat/completions",
         json.dumps({**ok_body, "model": "gpt-4o"}).encode(), js, 404, "not served"),
        ("no messages", "/v1/chat/completions", json.dumps({"model": MODEL}).encode(), js, 400,
         "messages"),
        ("bad part", "/v1/chat/completions", json.dumps({**ok_body, "messages": [{"role": "user",
         "content": [{"type": "image_url"}]}]}).encode(), js, 400, "type must be"),
        ("audio that fails to decode", "/v1/chat/completions", json.dumps({**ok_body, "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {
                "data": base64.b64encode(b"RIFF not really a wav").decode()}}]}]}).encode(),
         js, 400, "could not be decoded"),
        ("bad sampling", "/v1/chat/completions",
         json.dumps({**ok_body, "temperature": -1}).encode(), js, 400, "temperature"),
        ("huge upload", "/v1/audio/transcriptions", b"0" * (2 << 20),
         {"Content-Type": "multipart/form-data; boundary=x"}, 413, "exceeds"),
    ]  # fmt: skip
    for name, path, body, headers, status, words in cases:
        got, _, data = _raw(server, "POST", path, body, headers)
        err = json.loads(data)["error"]
        assert got == status and words in err["message"], (name, got, err)
    with pytest.raises(openai.BadRequestError, match="could not be decoded"):
        client.audio.transcriptions.create(model=MODEL, file=("x.wav", b"garbage"))
    with pytest.raises(openai.NotFoundError), open(speech_wav, "rb") as f:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    assert client.chat.completions.create(**ok_body).choices[0].message.content is not None
    status, _, data = _raw(server, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    status, headers, data = _raw(server, "GET", "/metrics")
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("kimia_queue_length", "kimia_active_slots", "kimia_generated_tokens_total",
                 "kimia_tokens_per_second", "kimia_time_to_first_token_seconds_count",
                 "kimia_time_to_first_audio_seconds_count"):  # fmt: skip
        assert name in text, name
    ttft = [ln for ln in text.splitlines() if ln.startswith("kimia_time_to_first_token_seconds_c")]
    assert float(ttft[0].split()[-1]) >= 1


def test_overload_answers_429_with_retry_after_and_loses_no_accepted_request(kimia):
    """1 slot and a queue of 1: of 6 simultaneous streamed chats some get 429 + Retry-After, and
    every accepted one streams to its [DONE]."""
    eng = Engine.from_kimia(kimia, EngineConfig(slots=1, capacity=256, prefill_chunk=32,
                                                steps_per_tick=3, max_queue=1))  # fmt: skip
    app = create_app(kimia, eng, ServerConfig(model_names=(MODEL,)))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "one two"}],
                       "max_tokens": 24, "stream": True}).encode()  # fmt: skip
    results = [None] * 6
    try:
        with BackgroundServer(app) as s:
            barrier = threading.Barrier(6)

            def call(i):
                barrier.wait()
                results[i] = _raw(s, "POST", "/v1/chat/completions", body,
                                  {"Content-Type": "application/json"})  # fmt: skip

            threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        eng.stop()
    codes = sorted(r[0] for r in results)
    assert 429 in codes and 200 in codes, codes
    for status, headers, data in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert "busy" in json.loads(data)["error"]["message"]
        else:
            assert status == 200 and data.decode().rstrip().endswith("data: [DONE]")
            assert '"finish_reason": "length"' in data.decode()


def _pcm16(x):
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def test_realtime_websocket_turn(kimia, engine, server):
    """Silence, 1.2 s of speech-level signal, silence, sent as 100 ms PCM chunks: the energy VAD
    ends the turn, text pieces and 24 kHz PCM chunks stream back, and the reply equals the
    engine's reply to the VAD's turn audio."""
    from websockets.sync.client import connect

    sr = 16000
    rng = np.random.default_rng(0)
    t = np.arange(int(1.2 * sr)) / sr
    speech = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size)
    signal = np.concatenate([np.zeros(sr // 2), speech, np.zeros(sr)]).astype(np.float32)
    chunks = [signal[i : i + sr // 10] for i in range(0, signal.size, sr // 10)]
    vcfg = {"silence_ms": 400}
    turn = None
    vad = EnergyVad(VadConfig(**vcfg))
    for c in chunks:
        turn = vad.push(np.frombuffer(_pcm16(c), "<i2").astype(np.float32) / 32768.0)
        if turn is not None:
            break
    assert turn is not None
    want = _direct(kimia, engine, [{"role": "user", "message_type": "audio",
                                    "content": (turn, sr)}], OutputType.BOTH)  # fmt: skip
    url = server.url.replace("http://", "ws://") + "/v1/realtime"
    texts, audio, done = [], [], None
    with connect(url, open_timeout=30, close_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.ready"
        ws.send(json.dumps({"type": "session.update", "vad": vcfg}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.updated"
        for c in chunks:
            ws.send(_pcm16(c))
        ws.send(b"\x00")  # odd byte count: an error message, the session goes on
        while done is None:
            m = ws.recv(timeout=300)
            if isinstance(m, bytes):
                audio.append(np.frombuffer(m, "<i2"))
                continue
            ev = json.loads(m)
            if ev["type"] == "response.text":
                texts.append(ev["text"])
            elif ev["type"] == "response.done":
                done = ev
    assert done["text"] == "".join(texts) == want["text"]
    got = np.concatenate(audio) if audio else np.zeros(0, np.int16)
    ref = np.zeros(0) if want["audio"] is None else want["audio"]
    assert got.shape == ref.shape


def test_page_is_served(server):
    status, headers, data = _raw(server, "GET", "/")
    assert (
        status == 200
        and b"/v1/realtime" in data
        and headers["content-type"].startswith("text/html")
    )

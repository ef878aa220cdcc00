"""The real-time session: frames keep flowing during a reply, barge-in, multi-turn memory (prompt
level and through `WS /v1/realtime` with the `websockets` client), trimming, reset."""

import json
import time

import numpy as np
import pytest

from kimia_jax.configs import OutputType
from kimia_jax.inference.sampler import Sampling
from kimia_jax.serving.realtime import Conversation
from kimia_jax.serving.server import BackgroundServer, ServerConfig, create_app
from kimia_jax.serving.vad import EnergyVad, VadConfig

SR = 16000
VAD = {"silence_ms": 400}


def _speech(seconds, f0, seed):
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2.5 * f0 * t)
    return (x + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _turn(seconds, f0, seed):
    """Silence, speech, silence (long enough for the VAD to end the turn)."""
    z = np.zeros(SR // 4, np.float32)
    return np.concatenate([z, _speech(seconds, f0, seed), z, z])


def _pcm16(x):
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def _chunks(x):
    return [x[i : i + SR // 10] for i in range(0, x.size, SR // 10)]


def _vad_turns(chunks):
    """The turns the server's VAD cuts from these chunks (same samples, same config)."""
    vad, turns = EnergyVad(VadConfig(**VAD)), []
    for c in chunks:
        t = vad.push(np.frombuffer(_pcm16(c), "<i2").astype(np.float32) / 32768.0)
        if t is not None:
            turns.append(t)
    return turns


def _user(clip):
    return {"role": "user", "message_type": "audio", "content": clip}


def _assert_same_prompt(got, want):
    np.testing.assert_array_equal(got.audio_ids, want.audio_ids)
    np.testing.assert_array_equal(got.text_ids, want.text_ids)
    np.testing.assert_array_equal(got.is_continuous, want.is_continuous)
    assert len(got.features) == len(want.features)
    for a, b in zip(got.features, want.features, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_conversation_prompts_trimming_and_reset(kimia):
    """The session's prompts equal `KimiAudio.prompts` of the same messages (the one builder; clips
    encoded one at a time by the session, together by `prompts`; features measured equal to
    fp32 rounding); a spoken reply is remembered as "audio-text" with its codes; the oldest
    exchange is dropped once prompt + reserve exceeds the slot; reset forgets; memory off."""
    big = Conversation(kimia, capacity=4096, reply_tokens=64)
    pairs = [big.encode(_speech(0.6, f, i), SR) for i, f in enumerate((200, 260, 330))]
    clips, encoded = [c for c, _ in pairs], [e for _, e in pairs]
    off = kimia.kimia_token_offset
    replies = [
        ("one two three", [off + 5, off + 9, 7, off + 11] * 3, OutputType.BOTH),
        ("four five", None, OutputType.TEXT),
    ]
    lengths = []
    for k in range(3):
        b = big.build(clips[k], encoded[k], OutputType.BOTH)
        (want,) = kimia.prompts([b.messages], OutputType.BOTH)
        _assert_same_prompt(b.prompt, want)
        assert b.trimmed == 0 and len(b.messages) == 2 * k + 1
        lengths.append(len(b.prompt))
        big.commit(b)
        if k < 2:
            text, ids, out = replies[k]
            big.add_reply(text, ids, out, big.epoch)
    spoken, written = big.messages[1], big.messages[3]
    assert spoken["message_type"] == "audio-text" and spoken["content"][1] == "one two three"
    assert spoken["audio_tokens"].tolist() == [off + 5, off + 9, off + 11] * 3
    assert written == {"role": "assistant", "message_type": "text", "content": "four five"}
    assert lengths[0] < lengths[1] < lengths[2]

    # a slot that holds the last two exchanges and the reserve, not all three
    (two,) = kimia.prompts([big.messages[2:]], OutputType.BOTH)
    small = Conversation(kimia, capacity=len(two) + 64, reply_tokens=64)
    small.messages = big.messages[:4]
    small._codes = {k: v for e in encoded[:2] for k, v in e.codes.items()}
    small._features = {k: v for e in encoded[:2] for k, v in (e.features or {}).items()}
    b = small.build(clips[2], encoded[2], OutputType.BOTH)
    assert b.trimmed == 1 and b.messages == big.messages[2:]
    assert len(b.prompt) == len(two) and len(b.prompt) + small.reserve <= small.capacity
    small.commit(b)
    assert len(small._codes) == 2  # the dropped turn's clip is forgotten
    # memory off: the turn alone
    assert small.build(clips[2], encoded[2], OutputType.BOTH, memory=False).messages == [
        _user(clips[2])
    ]
    # reset: empty history, and a reply of the old epoch is not remembered
    epoch = small.epoch
    small.reset()
    small.add_reply("late", None, OutputType.TEXT, epoch)
    assert small.messages == [] and small._codes == {}
    assert len(small.build(clips[0], encoded[0], OutputType.BOTH).prompt) == lengths[0]


@pytest.fixture(scope="module")
def ws_url(kimia, engine):
    app = create_app(kimia, engine, ServerConfig(realtime_reply_tokens=32))
    with BackgroundServer(app) as s:
        yield s.url.replace("http://", "ws://") + "/v1/realtime"


def _recv(ws, timeout=300):
    m = ws.recv(timeout=timeout)
    return ("audio", m) if isinstance(m, bytes) else (json.loads(m)["type"], json.loads(m))


def _until(ws, kind, log):
    """Receives (into `log`) until a message of type `kind` (or one of a tuple) arrives."""
    kinds = (kind,) if isinstance(kind, str) else kind
    while True:
        t, m = _recv(ws)
        log.append((t, m))
        if t in kinds:
            return m


def _open(ws, **update):
    assert _recv(ws, 30)[0] == "session.ready"
    ws.send(json.dumps({"type": "session.update", "vad": VAD, **update}))
    assert _recv(ws, 30)[0] == "session.updated"


def test_frames_flow_during_a_reply_and_the_second_turn_remembers_the_first(kimia, engine, ws_url):
    """Two turns sent back to back (barge-in off, text replies): both `turn.end`s arrive before
    the first reply ends (the receive loop does not wait for replies); the second prompt holds
    the first exchange, and the second reply equals the engine's greedy reply to the direct
    three-message conversation (user audio, assistant text, user audio), token for token."""
    from websockets.sync.client import connect

    chunks = _chunks(np.concatenate([_turn(0.8, 220, 0), _turn(0.6, 300, 1)]))
    t1, t2 = _vad_turns(chunks)
    log = []
    with connect(ws_url, open_timeout=30, close_timeout=5) as ws:
        _open(ws, output="text", barge_in=False, sampling={"max_new_tokens": 12})
        for c in chunks:
            ws.send(_pcm16(c))
        done1 = _until(ws, "response.done", log)
        done2 = _until(ws, "response.done", log)
    kinds = [t for t, _ in log]
    assert kinds.count("turn.end") == 2 and kinds.index("response.done") > max(
        i for i, k in enumerate(kinds) if k == "turn.end"
    ), kinds
    h1, h2 = (m for t, m in log if t == "session.history")
    assert (h1["messages"], h2["messages"], h2["trimmed"]) == (1, 3, 0)
    assert done1["turn"] == 1 and done2["turn"] == 2 and done1["text"]
    msgs = [
        _user((t1, SR)),
        {"role": "assistant", "message_type": "text", "content": done1["text"]},
        _user((t2, SR)),
    ]
    (p1,), (p2,) = (
        kimia.prompts([msgs[:1]], OutputType.TEXT),
        kimia.prompts([msgs], OutputType.TEXT),
    )
    assert (h1["prompt_tokens"], h2["prompt_tokens"]) == (len(p1), len(p2))
    sampling = Sampling(max_new_tokens=12)
    want = engine.submit(p2, OutputType.TEXT, sampling, 0).result(timeout=300)
    assert done2["text"] == want["text"] and done2["reason"] == want["reason"]


def test_barge_in_cancels_the_reply_frees_the_slot_and_reset_forgets(engine, ws_url):
    """Speech onset while a reply runs: `response.cancelled` (with the text sent so far) and the
    engine slot is freed; `session.reset` then clears the memory, so the next turn's prompt is the
    turn alone (one message)."""
    from websockets.sync.client import connect

    log = []
    with connect(ws_url, open_timeout=30, close_timeout=5) as ws:
        _open(ws, output="text")
        for c in _chunks(_turn(0.8, 220, 0)):
            ws.send(_pcm16(c))
        _until(ws, "session.history", log)  # the reply is being submitted
        t0 = time.perf_counter()
        for c in _chunks(_speech(0.3, 300, 1)):  # the user speaks again, no end of turn yet
            ws.send(_pcm16(c))
        cancelled = _until(ws, "response.cancelled", log)
        assert cancelled["reason"] == "barge_in" and cancelled["turn"] == 1, log
        assert "response.done" not in [t for t, _ in log]
        assert cancelled["text"] == "".join(m["text"] for t, m in log if t == "response.text")
        while engine.active_slots:
            assert time.perf_counter() - t0 < 60, "the cancelled request kept its slot"
            time.sleep(0.05)
        ws.send(json.dumps({"type": "session.reset"}))
        assert _until(ws, "session.history", log)["reset"]
        ws.send(json.dumps({"type": "input.end"}))  # push-to-talk end of the second turn
        assert _until(ws, "turn.end", log)["turn"] == 2
        h = _until(ws, "session.history", log)
        assert h["turn"] == 2 and h["messages"] == 1
        done = _until(ws, "response.done", log)
        assert done["turn"] == 2 and done["reason"] in ("stop", "length")


def test_bad_control_messages_are_named_and_a_disconnect_frees_the_slot(engine, ws_url):
    """Malformed or invalid control messages get an `error` naming the field and change nothing;
    closing the connection while a reply runs cancels its engine request."""
    from websockets.sync.client import connect

    bad = [
        ("not json", "JSON objects"),
        (json.dumps({"type": "dance"}), "unknown type"),
        (json.dumps({"type": "session.update", "barge_in": "yes"}), "barge_in"),
        (json.dumps({"type": "session.update", "reply_tokens": 0}), "reply_tokens"),
        (json.dumps({"type": "session.update", "sampling": {"top_p": 0.9}}), "top_p"),
        (json.dumps({"type": "session.update", "sampling": {"text_temperature": -1}}), "text_tem"),
        (json.dumps({"type": "session.update", "vad": {"silence_ms": 0}}), "silence_ms"),
        (json.dumps({"type": "session.update", "output": "video"}), "video"),
        (json.dumps({"type": "input.end"}), "no speech"),
    ]
    log = []
    with connect(ws_url, open_timeout=30, close_timeout=5) as ws:
        ready = _recv(ws, 30)[1]
        for raw, words in bad:
            ws.send(raw)
            kind, m = _recv(ws, 30)
            assert kind == "error" and words in m["message"], (raw, m)
        ws.send(json.dumps({"type": "session.update", "memory": False, "output": "text"}))
        kind, m = _recv(ws, 30)
        assert kind == "session.updated" and not m["memory"] and m["barge_in"]
        keep = ("vad", "reply_tokens", "sampling")  # unchanged by the bad updates and this one
        assert {k: m[k] for k in keep} == {k: ready[k] for k in keep}
        ws.send(json.dumps({"type": "session.update", "vad": VAD}))
        assert _recv(ws, 30)[1]["vad"]["silence_ms"] == VAD["silence_ms"]
        for c in _chunks(_turn(0.8, 220, 0)):
            ws.send(_pcm16(c))
        assert _until(ws, "session.history", log)["messages"] == 1
        _until(ws, ("response.text", "response.done"), log)  # the reply is running
    t0 = time.perf_counter()
    while engine.active_slots:
        assert time.perf_counter() - t0 < 60, "the disconnected session's request kept its slot"
        time.sleep(0.05)

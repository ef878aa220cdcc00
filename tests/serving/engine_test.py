"""Continuous batching: requests joining at random steps get exactly their solo tokens."""

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.configs import OutputType
from kimia_jax.errors import PromptError
from kimia_jax.inference import pipeline
from kimia_jax.inference.sampler import Sampling
from kimia_jax.serving.engine import Engine, EngineBusy, EngineConfig, Request

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# Greedy, the tiny model speaks 14 audio codes in the first 240 steps of this "both" chat.
STORY = [{"role": "user", "message_type": "text", "content": "Tell me a story."}]


def _alone(kimia, prompt, output_type, sampling, seed=0, capacity=256):
    """The tokens `KimiAudio.generate` gets for this prompt alone (batch of one), with the
    engine's budget (the official one, cut to the slot's `capacity` positions)."""
    b = pipeline.plan_batch([prompt], output_type, sampling.max_new_tokens, kimia.cfg)
    b = dataclasses.replace(b, budget=jnp.minimum(b.budget, capacity - len(prompt)))
    out = pipeline.run_generate(
        kimia.params,
        kimia.model,
        b,
        kimia._stream_cfg(output_type),
        sampling,
        jax.random.key(seed),
        None,
    )
    return out.tokens[0]


@pytest.mark.slow
def test_sixteen_requests_at_random_times_get_their_solo_tokens(kimia, engine, speech_wav):
    """16 greedy requests (12 text chats of 1-40 words, some longer than a prefill chunk; 2 with
    audio input, i.e. whisper features; 2 spoken replies cut at the slot's 256 positions) arrive
    at random times over 4 slots.
    Each gets exactly the (audio, text) tokens that `generate` gives it alone (measured: all 16
    identical), and the two spoken replies' streamed audio equals `detokenize` of their codes
    (measured max abs difference 0.0)."""
    rng = np.random.default_rng(1)
    jobs = []
    for i in range(16):
        if i in (3, 11):
            chat = [
                {"role": "user", "message_type": "text", "content": "Answer briefly."},
                {"role": "user", "message_type": "audio", "content": str(speech_wav)},
            ]
            jobs.append((chat, OutputType.TEXT, Sampling(max_new_tokens=int(rng.integers(8, 30)))))
        elif i in (5, 9):
            jobs.append((STORY, OutputType.BOTH, Sampling()))
        else:
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 40))))
            chat = [{"role": "user", "message_type": "text", "content": text}]
            jobs.append((chat, OutputType.TEXT, Sampling(max_new_tokens=int(rng.integers(8, 40)))))
    prompts = [kimia.prompts([c], o)[0] for c, o, _ in jobs]
    assert max(len(p) for p in prompts) > engine.config.prefill_chunk  # chunked prefill is used
    delays = rng.uniform(0, 0.4, size=16)
    reqs = [None] * 16

    def client(i):
        time.sleep(delays[i])
        reqs[i] = engine.submit(prompts[i], jobs[i][1], jobs[i][2], seed=0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [r.result(timeout=600) for r in reqs]
    for i, ((_, otype, samp), p, res) in enumerate(zip(jobs, prompts, results, strict=True)):
        audio, text = _alone(kimia, p, otype, samp)
        assert res["reason"] in ("stop", "length"), (i, res)
        assert list(res["tokens"][1]) == text, f"request {i}: text tokens differ"
        assert list(res["tokens"][0]) == audio, f"request {i}: audio tokens differ"
        codes, words = kimia.text_decoder.postprocess(audio, text)
        assert res["text"] == words
        if otype == OutputType.BOTH:
            assert codes.size == 14
            ref = kimia.detokenize_audio(codes, seed=0)
            assert res["audio"] is not None and res["audio"].shape == ref.shape
            assert float(np.max(np.abs(res["audio"] - ref))) == 0.0


def test_cancel_and_timeout_free_the_slot(kimia, engine):
    """A cancelled request ends with reason "cancelled", one past its deadline with "timeout";
    the next request still gets its solo tokens."""
    chat = [{"role": "user", "message_type": "text", "content": "one two three"}]
    (p,) = kimia.prompts([chat], OutputType.TEXT)
    long = Sampling(max_new_tokens=200)
    r = engine.submit(p, OutputType.TEXT, long)
    first = next(r.events(timeout=120))
    assert "text" in first or first.get("done")
    r.cancel()
    assert r.result(timeout=60)["reason"] == "cancelled"
    t = engine.submit(p, OutputType.TEXT, long, timeout_s=0.05)
    assert t.result(timeout=60)["reason"] == "timeout"
    ok = engine.submit(p, OutputType.TEXT, Sampling(max_new_tokens=12)).result(timeout=120)
    audio, text = _alone(kimia, p, OutputType.TEXT, Sampling(max_new_tokens=12))
    assert list(ok["tokens"][1]) == text and ok["reason"] == "length"
    assert engine.active_slots == 0


def test_full_queue_says_busy_and_loses_no_accepted_request(kimia):
    """A queue of 2 behind 1 slot: of 8 instant submissions, the first ones are accepted and
    every one of them finishes; the rest get EngineBusy with a retry-after >= 1 s."""
    eng = Engine.from_kimia(
        kimia, EngineConfig(slots=1, capacity=256, prefill_chunk=32, steps_per_tick=3, max_queue=2)
    ).start()
    try:
        chat = [{"role": "user", "message_type": "text", "content": "four five"}]
        (p,) = kimia.prompts([chat], OutputType.TEXT)
        accepted, busy = [], []
        for _ in range(8):
            try:
                accepted.append(eng.submit(p, OutputType.TEXT, Sampling(max_new_tokens=16)))
            except EngineBusy as e:
                busy.append(e)
        assert 2 <= len(accepted) <= 3 and len(busy) == 8 - len(accepted)
        assert all(e.retry_after >= 1 and "retry after" in str(e) for e in busy)
        assert [r.result(timeout=300)["reason"] for r in accepted] == ["length"] * len(accepted)
    finally:
        eng.stop()


def test_bad_engine_settings_are_named():
    with pytest.raises(ValueError, match="capacity"):
        EngineConfig(capacity=100, prefill_chunk=64)
    with pytest.raises(ValueError, match="slots"):
        EngineConfig(slots=0)


@pytest.mark.slow
def test_voice_prompt_streams_the_prefilled_voice(kimia, engine, speech_wav):
    """A spoken reply with a voice prompt (the detokenizer's `prefill`, per request here) streams
    exactly `KimiAudio.detokenize_audio(codes, voice_prompt=...)` of its codes (measured max abs
    difference 0.0), and differs from the same codes without the prompt; a voice prompt on a
    text reply is refused."""
    voice = kimia.voice_prompt(str(speech_wav))
    (p,) = kimia.prompts([STORY], OutputType.BOTH)
    res = engine.submit(p, OutputType.BOTH, Sampling(), seed=0, voice_prompt=voice).result(600)
    codes, _ = kimia.text_decoder.postprocess(*res["tokens"])
    assert codes.size > 0 and res["audio"] is not None
    ref = kimia.detokenize_audio(codes, seed=0, voice_prompt=voice)
    assert res["audio"].shape == ref.shape
    assert float(np.max(np.abs(res["audio"] - ref))) == 0.0
    plain = kimia.detokenize_audio(codes, seed=0)
    assert float(np.max(np.abs(plain - ref))) > 1e-3
    with pytest.raises(PromptError, match="voice_prompt"):
        engine.submit(p, OutputType.TEXT, Sampling(), voice_prompt=voice)


@pytest.mark.nightly
def test_int8_engine_gets_the_int8_models_solo_tokens(kimia, speech_wav):
    """The engine over an int8-quantized `KimiAudio` (the server's --quantize=int8) gives each
    request the tokens the same quantized model gets alone."""
    from kimia_jax.inference.api import KimiAudio

    q = KimiAudio(kimia.model_path, load_detokenizer=False, dtype="float32", quantize="int8")
    cfg = EngineConfig(slots=2, capacity=256, prefill_chunk=32, steps_per_tick=3, max_queue=8)
    eng = Engine.from_kimia(q, cfg).start()
    try:
        chats = [
            [{"role": "user", "message_type": "text", "content": "one two three four"}],
            [{"role": "user", "message_type": "audio", "content": str(speech_wav)}],
        ]
        prompts = [q.prompts([c], OutputType.TEXT)[0] for c in chats]
        samp = Sampling(max_new_tokens=16)
        reqs = [eng.submit(p, OutputType.TEXT, samp) for p in prompts]
        for p, r in zip(prompts, reqs, strict=True):
            res = r.result(timeout=600)
            _, text = _alone(q, p, OutputType.TEXT, samp)
            assert list(res["tokens"][1]) == text
    finally:
        eng.stop()


# Chunks each reply's audio is decoded in, by schedule (first chunk 30 tokens, then 30; "B1f" is
# B's chunk 1, its final one; "A1-2" one job of A's chunks 1 and 2): codes arrive in three waves
# (A: 31; A: 69 more, B: 45, C: 20; C: 11 more, then every reply ends).
SCHEDULE_ORDER = {
    # first chunks first (B0 ahead of A's backlog, C0 ahead of everything), then least audio sent
    # (the clock is frozen, so a deadline is the audio sent), one chunk per job
    "first_chunk": ["A0", "B0", "A1", "A2", "C0", "B1f", "C1f", "A3f"],
    # arrival order of complete work, all of a reply's complete chunks in one job
    "fifo": ["A0", "A1-2", "B0", "C0-1f", "A3f", "B1f"],
}


@pytest.mark.parametrize("schedule", ["first_chunk", "fifo"])
def test_detokenizer_schedule_runs_first_chunks_first_and_stays_exact(kimia, schedule):
    """The engine's detokenizer jobs (`Engine._detok_job`, the real tiny detokenizer, driven here
    one job at a time without threads) run in the order of SCHEDULE_ORDER, and each reply's
    streamed audio equals `Detokenizer.detokenize` of its codes (measured max abs difference 0.0
    under both schedules)."""
    det = kimia.detokenizer
    cfg = EngineConfig(slots=1, capacity=256, prefill_chunk=32, detok_schedule=schedule)
    eng = Engine.from_kimia(kimia, cfg)
    eng._detok.clock = lambda: 0.0
    rng = np.random.default_rng(0)
    n = {"A": 100, "B": 45, "C": 31}
    codes = {k: rng.integers(0, det.dit_cfg.semantic_vocab_size, v) for k, v in n.items()}
    reqs = {
        k: Request(i, None, OutputType.BOTH, Sampling(), 10 + i, 1, float("inf"))
        for i, k in enumerate("ABC")
    }
    name = {r.id: k for k, r in reqs.items()}
    order = []

    def run_ready():
        while (job := eng._detok.next_job()) is not None:
            stream, _, final = job
            c0 = stream.chunks
            eng._detok_job(*job)
            c1 = stream.state.chunk_index
            order.append(f"{name[stream.key]}{c0}{'' if c1 == c0 + 1 else f'-{c1 - 1}'}")
            order[-1] += "f" if final else ""

    eng._detok_put(reqs["A"], codes["A"][:31])
    run_ready()
    eng._detok_put(reqs["A"], codes["A"][31:])
    eng._detok_put(reqs["B"], codes["B"])
    eng._detok_put(reqs["C"], codes["C"][:20])
    run_ready()
    eng._detok_put(reqs["C"], codes["C"][20:])
    for k in "ABC":
        eng._detok_put(reqs[k], codes[k][:0], {"done": True, "reason": "stop"})
    run_ready()
    assert order == SCHEDULE_ORDER[schedule]
    assert len(eng._detok) == 0
    for k, r in reqs.items():
        res = r.result(timeout=0)
        assert res["reason"] == "stop"
        ref = det.detokenize(codes[k], key=r.seed)
        assert res["audio"].shape == ref.shape
        assert float(np.max(np.abs(res["audio"] - ref))) == 0.0, k


@pytest.mark.nightly
def test_spoken_replies_with_many_chunks_stream_exactly_with_two_workers(kimia):
    """Three concurrent spoken replies of ~100 codes (4 detokenizer chunks each: the audio head
    of the tiny model is restricted to semantic ids, as in bench_serve --speech_heavy) on two
    detokenizer workers and the "first_chunk" schedule: each reply's streamed audio equals
    `KimiAudio.detokenize_audio` of its codes (measured max abs difference 0.0)."""
    w = kimia.params["mimo_output"]["weight"]
    params = dict(kimia.params, mimo_output={"weight": w.at[: kimia.cfg.kimia_token_offset].set(0)})
    cfg = EngineConfig(slots=4, capacity=128, prefill_chunk=32, steps_per_tick=4, detok_workers=2)
    eng = Engine(
        params,
        kimia.model,
        kimia.extra_tokens,
        kimia.text_decoder,
        kimia.detokenizer,
        kimia.cfg.kimia_adaptor_input_dim,
        kimia.mesh,
        cfg,
    ).start()
    try:
        chats = [
            [{"role": "user", "message_type": "text", "content": t}]
            for t in ("Tell me a story.", "one two three", "Sing.")
        ]
        prompts = [kimia.prompts([c], OutputType.BOTH)[0] for c in chats]
        reqs = [eng.submit(p, OutputType.BOTH, Sampling(), seed=i) for i, p in enumerate(prompts)]
        for i, r in enumerate(reqs):
            res = r.result(timeout=600)
            codes, _ = kimia.text_decoder.postprocess(*res["tokens"])
            assert codes.size > 90, codes.size  # several chunks of 30
            ref = kimia.detokenize_audio(codes, seed=i)
            assert res["audio"].shape == ref.shape
            assert float(np.max(np.abs(res["audio"] - ref))) == 0.0, i
    finally:
        eng.stop()

"""`data.prepare` end to end on the DirectRunner: real clips (LibriSpeech, Kimi-Audio's spoken
question, synthetic 44.1 kHz stereo), a long recording segmented by the VAD, the official SFT
jsonl, and one row per bad-input kind.

Measured: tokens in the shards equal the tokenizer's direct output exactly (int equality), text
ids equal tiktoken's; stored audio equals the official loader's samples exactly for 16-bit 16 kHz
sources and within half an int16 step (1.5e-5) for the resampled 44.1 kHz clip; SFT codes equal
the official `extract_semantic_codes` output of the training fixture exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import pipeline
from data.pipeline import PrepareConfig
from kimia_jax.audio import GlmTokenizer, load_audio
from kimia_jax.training import data as tdata
from kimia_jax.training.examples import PretrainExampleBuilder, Truncation
from tests.training import helpers as h

FIX = Path(__file__).parents[1] / "fixtures"
CLIPS = FIX / "data"
LIBRI = FIX / "training" / "audios"
GLM = FIX / "audio" / "glm-4-voice-tokenizer"
TEXT_TOK = FIX / "training" / "tokenizer"
NUM_SHARDS = 3

GOOD = {  # row id -> (audio, transcript)
    "libri1": (LIBRI / "librispeech_1263-139804-0001.flac", "he hoped there would be stew"),
    "libri2": (LIBRI / "librispeech_1263-139804-0002.flac", "and are capable of receiving"),
    "digits": (CLIPS / "en_digits_16k.flac", "seven three one nine zero four"),
    "question": (CLIPS / "en_question_44k_stereo.flac", "what is the capital of france"),
}
BAD = {  # row id -> expected drop reason
    "empty": "empty",
    "corrupt": "corrupt",
    "nan": "nan",
    "lowrate": "wrong_sample_rate",
    "missing": "missing_file",
    "french": "unsupported_language",
    "toolong": "too_long",
    "notext": "empty_transcript",
}


def _long_recording(path: Path) -> dict[str, float]:
    """kimi_qa + 1 s silence + digits + 3 s silence + libri5: the report's rules merge across the
    1 s gap (<= 2 s) and split at the 3 s one. Returns the boundaries in seconds."""
    qa = load_audio(CLIPS / "kimi_qa_example.flac")
    dg = load_audio(CLIPS / "en_digits_16k.flac")
    l5 = load_audio(LIBRI / "librispeech_1263-139804-0005.flac")
    z1, z3 = np.zeros(16000, np.float32), np.zeros(48000, np.float32)
    wav = np.concatenate([qa, z1, dg, z3, l5])
    sf.write(path, wav, 16000, subtype="FLOAT")
    s = 1 / 16000
    return {
        "qa_end": len(qa) * s,
        "dg_start": (len(qa) + 16000) * s,
        "gap3_start": (len(qa) + 16000 + len(dg)) * s,
        "l5_start": (len(qa) + 16000 + len(dg) + 48000) * s,
        "end": len(wav) * s,
    }


def make_inputs(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": k,
            "audio": str(a),
            "text": t,
            "language": "en",
            "doc_id": "book" if k.startswith("libri") else k,
        }
        for k, (a, t) in GOOD.items()
    ]
    (d / "empty.wav").write_bytes(b"")
    (d / "corrupt.wav").write_bytes(b"RIFF not really audio" * 10)
    nan = np.zeros(16000, np.float32)
    nan[5] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(d / "low.wav", np.full(8000, 0.1, np.float32), 8000)
    sf.write(d / "long.wav", np.random.default_rng(0).uniform(-0.1, 0.1, 16000 * 28), 16000)
    bad_audio = {
        "empty": "empty.wav",
        "corrupt": "corrupt.wav",
        "nan": "nan.wav",
        "lowrate": "low.wav",
        "missing": "nope.wav",
        "toolong": "long.wav",
    }
    rows += [{"id": k, "audio": str(d / a), "text": "some words"} for k, a in bad_audio.items()]
    rows.append({"id": "notext", "audio": str(CLIPS / "en_digits_16k.flac"), "text": " "})
    rows.append(
        {
            "id": "french",
            "audio": str(CLIPS / "en_digits_16k.flac"),
            "text": "bonjour",
            "language": "fr",
        }
    )
    regions = _long_recording(d / "recording.wav")
    rows.append({"id": "recording", "audio": str(d / "recording.wav")})
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the official SFT jsonl of the training fixture, audio_tokens removed, paths absolute
    sft = []
    for r in h.records():
        r = json.loads(json.dumps(r))
        for m in r["conversation"]:
            if m["message_type"] == "audio":
                m.pop("audio_tokens")
                m["content"] = str(FIX / "training" / m["content"])
        sft.append(r)
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return {"inputs": [str(d / "rows.jsonl"), str(d / "sft.jsonl")], "regions": regions}


def cfg(out: Path) -> PrepareConfig:
    return PrepareConfig(str(out), str(GLM), str(TEXT_TOK), num_shards=NUM_SHARDS, batch_size=4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    inp = make_inputs(d / "in")
    res = pipeline.run(inp["inputs"], cfg(d / "out"), ["--runner=DirectRunner"])
    return {"out": d / "out", "res": res, **inp}


@pytest.fixture(scope="module")
def tok():
    return GlmTokenizer.from_pretrained(GLM)


def _segments(out: Path) -> list[dict]:
    segs = []
    for rec in tdata.ArrayRecordSource(pipeline.shard_files(out, "pt_docs")):
        n = int(rec["num_segments"])
        codes = np.split(np.asarray(rec["codes_orig_flat"]), np.cumsum(rec["codes_len"])[:-1])
        texts = np.split(np.asarray(rec["text_ids_flat"]), np.cumsum(rec["text_ids_len"])[:-1])
        for i in range(n):
            segs.append(
                {
                    "row_id": rec["row_id"][i],
                    "codes": codes[i],
                    "text_ids": texts[i],
                    "text": rec["text"][i],
                    "has_text": bool(rec["seg_has_text"][i]),
                    "start": float(rec["seg_start_s"][i]),
                    "end": float(rec["seg_end_s"][i]),
                    "ref": np.asarray(rec["audio_ref_orig"])[i],
                    "n": int(rec["num_samples_16k"][i]),
                    "lang": rec["seg_lang"][i],
                    "doc_id": rec["doc_id"],
                }
            )
    return segs


def test_every_row_in_a_shard_or_the_drop_report(prepared):
    c = prepared["res"]["card"]
    ids = set(GOOD) | set(BAD) | {"recording"} | {f"sft:{i}" for i in range(1, 5)}
    assert c["rows_in"] == len(ids) and c["finished_shards"] == NUM_SHARDS
    written, drops = set(), {}
    for k in range(NUM_SHARDS):
        m = json.loads(pipeline.marker_path(prepared["out"], k, NUM_SHARDS).read_text())
        written |= set(m["rows"])
        drops.update({d["row_id"]: d["reason"] for d in m["drops"]})
    assert drops == BAD and set(BAD.values()) <= set(pipeline.DROP_REASONS)
    assert written == ids - set(BAD) and not written & set(drops)
    assert c["rows_written"] + c["rows_dropped"] == c["rows_in"]
    assert c["drops_by_reason"] == {r: 1 for r in BAD.values()}
    assert c["conversations"] == 4 and c["segments"] == len(GOOD) + 2
    md = (prepared["out"] / "DATASET_CARD.md").read_text()
    assert "| unsupported_language | 1 |" in md and "| en |" in md
    counters = prepared["res"]["counters"]
    assert counters["load.rows_in"] == len(GOOD) + len(BAD) + 1
    assert counters["tokenize.segments"] == len(GOOD) + 2


def test_tokens_text_and_audio_equal_direct_computation(prepared, tok):
    segs = _segments(prepared["out"])
    audio = tdata.AudioShards(prepared["out"])
    text = h.tokenizer()
    by_row: dict[str, list[dict]] = {}
    for s in segs:
        by_row.setdefault(s["row_id"], []).append(s)
        assert len(s["codes"]) == -(-s["n"] // 1280)
    # book: two rows of one recording, in manifest order, in one document
    assert [s["row_id"] for s in segs if s["doc_id"] == "book"] == ["libri1", "libri2"]
    for rid, (path, t) in GOOD.items():
        (s,) = by_row[rid]
        want = load_audio(path)
        np.testing.assert_array_equal(s["codes"], tok.tokenize([want])[0])
        assert s["has_text"] and s["text"] == t
        np.testing.assert_array_equal(s["text_ids"], text.encode(t))
        got = audio(s["ref"])
        assert len(got) == len(want) == s["n"]
        tol = 0 if rid != "question" else 0.5 / 32768  # resampled: one int16 rounding
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    # the long recording: VAD + merge (1 s gap) + split (3 s gap) -> the two true regions
    rec = load_audio(Path(prepared["inputs"][0]).parent / "recording.wav")
    got = sorted(by_row["recording"], key=lambda s: s["start"])
    assert len(got) == 2
    r = prepared["regions"]
    first, second = got
    assert first["start"] < r["qa_end"] - 1.0 and first["end"] > r["dg_start"] + 0.5  # merged
    assert r["gap3_start"] - 0.6 < first["end"] <= r["gap3_start"] + 0.35  # split at the 3 s gap
    assert r["l5_start"] - 0.35 <= second["start"] < r["l5_start"] + 0.6
    assert second["end"] > r["l5_start"] + 5 and second["end"] <= r["end"]
    for s in got:
        assert not s["has_text"] and s["lang"] == ""
        piece = rec[int(round(s["start"] * 16000)) : int(round(s["end"] * 16000))]
        np.testing.assert_array_equal(s["codes"], tok.tokenize([piece])[0])


def test_sft_records_equal_the_official_extract_and_builder(prepared):
    recs = list(tdata.ArrayRecordSource(pipeline.shard_files(prepared["out"], "sft")))
    by_id = {r["row_id"]: r for r in recs}
    b = h.builder()
    for i, official in enumerate(h.records(), start=1):
        r = by_id[f"sft:{i}"]
        want_codes = [
            np.asarray(m["audio_tokens"]) - h.OFFSET
            for m in official["conversation"]
            if m["message_type"] == "audio"
        ]
        got_codes = [np.asarray(m["codes"]) for m in r["messages"] if m["kind"] == "audio"]
        for g, w in zip(got_codes, want_codes, strict=True):
            np.testing.assert_array_equal(g, w)
        ours = tdata.sft_builder(b)(r)
        ref = b.official(official, FIX / "training")
        for f in ("audio_ids", "text_ids", "is_continuous", "audio_flags", "text_flags"):
            np.testing.assert_array_equal(getattr(ours, f), getattr(ref, f), err_msg=f)
        for x, y in zip(ours.audios, ref.audios, strict=True):
            np.testing.assert_array_equal(x, y)


def _all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_rerun_writes_nothing(prepared):
    out = prepared["out"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    res = pipeline.run(prepared["inputs"], cfg(out), ["--runner=DirectRunner"])
    assert res["shards_written"] == 0 and not res["card_written"]
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_interrupted_shard_is_redone_byte_identical(prepared, tmp_path):
    """The state a crash of shard k leaves (its record files written or half written, a staging
    file, no marker, no card): the re-run redoes shard k only and the folder equals the
    uninterrupted run byte for byte. (The real SIGKILL of the CLI: the nightly test below.)"""
    out = tmp_path / "out"
    shutil.copytree(prepared["out"], out)
    k = next(
        k
        for k in range(NUM_SHARDS)
        if json.loads(pipeline.marker_path(out, k, NUM_SHARDS).read_text())["segments"]
    )
    pipeline.marker_path(out, k, NUM_SHARDS).unlink()
    docs = out / f"pt_docs-{k:05d}-of-{NUM_SHARDS:05d}.array_record"
    docs.write_bytes(docs.read_bytes()[: docs.stat().st_size // 2])
    (out / f".audio-{k:05d}-of-{NUM_SHARDS:05d}.array_record.tmp-x1y2").write_bytes(b"partial")
    (out / "dataset_card.json").unlink()
    res = pipeline.run(prepared["inputs"], cfg(out), ["--runner=DirectRunner"])
    assert res["shards_written"] == 1
    assert _all_files(out) == _all_files(prepared["out"])


def test_changed_input_or_shard_count_is_refused(prepared, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(prepared["out"], out)
    with pytest.raises(ValueError, match="different input"):
        pipeline.run(prepared["inputs"][:1], cfg(out), ["--runner=DirectRunner"])
    bad = PrepareConfig(str(out), str(GLM), str(TEXT_TOK), num_shards=NUM_SHARDS + 1)
    with pytest.raises(ValueError, match="same count"):
        pipeline.run(prepared["inputs"], bad, ["--runner=DirectRunner"])
    with pytest.raises(FileNotFoundError, match="--glm_tokenizer"):
        pipeline.run(prepared["inputs"], PrepareConfig(str(out), str(tmp_path / "x")))


@pytest.mark.slow
def test_grain_pipeline_reads_the_shards_and_a_train_step_runs(prepared):
    from kimia_jax.training.train_step import TrainConfig, TrainStep

    spec = tdata.RowSpec(length=384, max_windows=2, pad_id=h.PAD, max_segments=4, wav_dtype="int16")
    pt = PretrainExampleBuilder(
        h.tokenizer().extra_tokens, kimia_token_offset=h.OFFSET, truncation=Truncation(spec.length)
    )
    docs = tdata.ArrayRecordSource(pipeline.shard_files(prepared["out"], "pt_docs"))
    audio = tdata.AudioShards(prepared["out"])
    transcribed = [r for r in docs if np.all(r["seg_has_text"])]  # ASR needs every transcript
    assert len(transcribed) >= 2
    tasks = [
        tdata.Task("asr", transcribed, tdata.pretrain_builder(pt, "asr", audio=audio), 1.0, 1),
        tdata.Task("audio_only", docs, tdata.pretrain_builder(pt, "audio_only"), 1.0, 2),
    ]
    it = iter(tdata.batches(tasks, spec, 2, process_index=0, process_count=1, buffer_size=4))
    lcfg, wcfg, params = h.params()
    ts = TrainStep(lcfg, wcfg, TrainConfig(packed=True))
    import jax
    import jax.numpy as jnp

    state = ts.init(jax.tree.map(jnp.array, params), whisper_trainable=False)  # steps donate
    losses = []
    for _ in range(2):
        batch = next(it)
        assert batch["audio_ids"].shape == (2, spec.length)
        assert (batch["audio_ids"] >= h.OFFSET).sum() > 50  # real codes from the shards
        state, metrics = ts(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)), losses


@pytest.mark.nightly
def test_cli_killed_mid_run_then_rerun_is_byte_identical(prepared, tmp_path):
    """`python -m data.prepare` in a subprocess, SIGKILLed once the first shard is finished."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "data.prepare",
        "--input=" + ",".join(prepared["inputs"]),
        f"--output={out}",
        f"--glm_tokenizer={GLM}",
        f"--text_tokenizer={TEXT_TOK}",
        f"--num_shards={NUM_SHARDS}",
        "--batch_size=4",
        "--runner=DirectRunner",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    repo = Path(__file__).parents[2]
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 600
    killed = False
    while proc.poll() is None and time.time() < deadline:
        done = [p for p in (out / "_shards").glob("0*.json")] if (out / "_shards").is_dir() else []
        real = [p for p in done if json.loads(p.read_text())["rows"]]
        if real:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert killed or "shards written" in res.stdout
    assert _all_files(out) == _all_files(prepared["out"])

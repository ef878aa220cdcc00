"""Pieces of `data/`: corpus readers, segmentation rules, model stages, `extract_codes`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import manifests, sft_codes, stages
from data.segmentation import Region, SegmentationConfig, energy_regions, merge_regions, split_long
from kimia_jax.audio import GlmTokenizer
from kimia_jax.errors import StageUnavailableError
from tests.training import helpers as h

FIX = Path(__file__).parents[1] / "fixtures"
LIBRI = FIX / "training" / "audios"
GLM = FIX / "audio" / "glm-4-voice-tokenizer"
SR = 16000


# -- corpus readers ------------------------------------------------------------------------------


def test_librispeech_aishell_wenetspeech_readers(tmp_path):
    ls = tmp_path / "LibriSpeech" / "dev" / "1263" / "139804"
    ls.mkdir(parents=True)
    for u in ("0001", "0002"):
        shutil.copy(LIBRI / f"librispeech_1263-139804-{u}.flac", ls / f"1263-139804-{u}.flac")
    (ls / "1263-139804.trans.txt").write_text(
        "1263-139804-0001 HELLO THERE\n1263-139804-0002 SECOND ONE\n"
    )
    rows = manifests.read_input(tmp_path / "LibriSpeech")
    assert [(r.row_id, r.doc_id, r.text, r.language, r.order) for r in rows] == [
        ("1263-139804-0001", "1263-139804", "hello there", "en", 0),
        ("1263-139804-0002", "1263-139804", "second one", "en", 1),
    ]
    assert Path(rows[0].audio).is_file()

    ai = tmp_path / "aishell"
    (ai / "transcript").mkdir(parents=True)
    (ai / "wav" / "train" / "S0002").mkdir(parents=True)
    sf.write(ai / "wav" / "train" / "S0002" / "BAC009S0002W0122.wav", np.zeros(SR), SR)
    (ai / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "BAC009S0002W0122 而 对 楼市 成交\n"
    )
    (r,) = manifests.read_input(ai)
    assert (r.row_id, r.doc_id, r.text, r.language) == (
        "BAC009S0002W0122",
        "S0002",
        "而对楼市成交",
        "zh",
    )

    ws = tmp_path / "wenet"
    (ws / "audio").mkdir(parents=True)
    meta = {
        "audios": [
            {
                "aid": "Y0001",
                "path": "audio/Y0001.wav",
                "segments": [
                    {"sid": "Y0001_S2", "begin_time": 3.0, "end_time": 4.5, "text": "第二"},
                    {"sid": "Y0001_S1", "begin_time": 0.5, "end_time": 2.0, "text": "第一"},
                ],
            }
        ]
    }
    (ws / "WenetSpeech.json").write_text(json.dumps(meta, ensure_ascii=False))
    rows = manifests.read_input(ws)
    assert [(r.row_id, r.doc_id, r.start_s, r.end_s, r.order) for r in rows] == [
        ("Y0001_S1", "Y0001", 0.5, 2.0, 0),
        ("Y0001_S2", "Y0001", 3.0, 4.5, 1),
    ]

    with pytest.raises(ValueError, match="not a LibriSpeech"):
        manifests.read_input(tmp_path / "aishell" / "wav")
    (tmp_path / "dup.jsonl").write_text(
        '{"audio": "a.wav", "id": "x"}\n{"audio": "b.wav", "id": "x"}\n'
    )
    with pytest.raises(ValueError, match="appears twice"):
        manifests.read_input(tmp_path / "dup.jsonl")


def test_guess_language():
    assert manifests.guess_language("这并不是告别，这是一个篇章的结束") == "zh"
    assert manifests.guess_language("The quick brown fox, 42 times.") == "en"
    assert manifests.guess_language("Bonjour à tous") == "other"
    assert manifests.guess_language("1234 !!") == "other"


# -- segmentation --------------------------------------------------------------------------------


def test_merge_rules_of_the_report():
    s = SR
    cfg = SegmentationConfig()
    # same speaker: gap 1.5 s merged, gap 2.5 s not; a merge past 27 s is refused
    got = merge_regions(
        [Region(0, 5 * s), Region(int(6.5 * s), 10 * s), Region(int(12.5 * s), 14 * s)], cfg
    )
    assert got == [Region(0, 10 * s), Region(int(12.5 * s), 14 * s)]
    got = merge_regions([Region(0, 20 * s), Region(21 * s, 28 * s)], cfg)
    assert got == [Region(0, 20 * s), Region(21 * s, 28 * s)]
    # different speakers are never merged
    got = merge_regions([Region(0, 2 * s, 0), Region(int(2.5 * s), 4 * s, 1)], cfg)
    assert len(got) == 2


def test_split_long_cuts_at_the_quietest_frame_and_caps_27s():
    rng = np.random.default_rng(0)
    wav = rng.uniform(-0.5, 0.5, 60 * SR).astype(np.float32)
    wav[20 * SR : int(20.2 * SR)] = 0  # a pause inside (13.5 s, 27 s]
    pieces = split_long(wav, Region(0, len(wav)))
    assert all(p.length <= 27 * SR for p in pieces)
    assert pieces[0].end == pytest.approx(20.1 * SR, abs=0.11 * SR)
    assert pieces[0].start == 0 and pieces[-1].end == len(wav)
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:], strict=False))


def test_energy_vad_finds_speech_between_silences():
    from kimia_jax.audio import load_audio

    speech = load_audio(LIBRI / "librispeech_1263-139804-0001.flac")
    wav = np.concatenate([np.zeros(2 * SR, np.float32), speech, np.zeros(3 * SR, np.float32)])
    regions = energy_regions(wav)
    assert regions[0].start >= 2 * SR - 0.15 * SR
    assert regions[-1].end <= 2 * SR + len(speech) + 0.15 * SR
    assert energy_regions(np.zeros(5 * SR, np.float32)) == []


# -- model stages ----------------------------------------------------------------------------------


def test_stages_fail_at_construction_when_package_or_weights_are_absent(tmp_path):
    with pytest.raises(StageUnavailableError, match="pyannote.audio"):
        stages.build_stages(diarization=str(tmp_path))
    with pytest.raises(StageUnavailableError, match="funasr"):
        stages.build_stages(transcription="paraformer-zh", transcription_model=str(tmp_path))
    with pytest.raises(StageUnavailableError, match="'df'"):
        stages.build_stages(enhancement=str(tmp_path))
    with pytest.raises(StageUnavailableError, match="needs a local model folder"):
        stages.build_stages(transcription="kimi-audio")
    with pytest.raises(StageUnavailableError, match="no such model folder"):
        stages.build_stages(transcription="kimi-audio", transcription_model=str(tmp_path / "x"))
    with pytest.raises(StageUnavailableError, match=r"--transcription_model=.*glm"):
        stages.build_stages(transcription="kimi-audio", transcription_model=str(tmp_path))
    assert stages.build_stages() == []


def test_punctuation_from_character_timestamps():
    chars = list("今天天气好")
    spans = [(0.0, 0.2), (0.2, 0.4), (1.1, 1.3), (1.3, 1.5), (2.8, 3.0)]
    assert stages.punctuate_from_timestamps(chars, spans) == "今天，天气。好"


@pytest.mark.slow
def test_kimi_audio_asr_stage_on_the_tiny_model(tmp_path):
    """The real stage: KimiAudio (tiny random model) transcribes; equals a direct generate."""
    from kimia_jax.audio import load_audio
    from kimia_jax.inference.api import KimiAudio
    from kimia_jax.testing import tiny_kimia

    model = tiny_kimia.write(tmp_path / "m", dtype="float32", detokenizer=False)
    (st,) = stages.build_stages(transcription="kimi-audio", transcription_model=str(model))
    st.max_new_tokens = 8
    st.setup()
    wav = load_audio(LIBRI / "librispeech_1263-139804-0001.flac")[: 3 * SR]
    items = [{"wav": wav, "text": None}]
    st.process(items)
    direct = KimiAudio(model, load_detokenizer=False, dtype="float32")
    _, want = direct.generate(
        [
            {"role": "user", "message_type": "text", "content": stages.ASR_PROMPT},
            {"role": "user", "message_type": "audio", "content": wav},
        ],
        "text",
        text_temperature=0.0,
        max_new_tokens=8,
    )
    assert items[0]["text"] == want and items[0]["asr_model"] == "kimi-audio-asr"
    assert items[0]["language"] == manifests.guess_language(want)


# -- extract_codes ---------------------------------------------------------------------------------


def test_extract_codes_equals_the_official_output(tmp_path):
    """The training fixture's data_with_semantic_codes.jsonl was written by the official
    extract_semantic_codes (tiny GLM tokenizer, offset 680): ours gives the same lines exactly."""
    want = h.records()
    lines = json.loads(json.dumps(want))
    for r in lines:
        for m in r["conversation"]:
            m.pop("audio_tokens", None)
    lines[0]["conversation"][1]["audio_tokens"] = [1, 2, 3]  # stale tokens are recomputed
    tok = GlmTokenizer.from_pretrained(GLM, max_batch=4)
    got, bad = sft_codes.extract(lines, tok, FIX / "training", offset=h.OFFSET, batch_size=3)
    assert bad == [] and got == want
    lines.append(
        {
            "task_type": "understanding",
            "conversation": [
                {"role": "user", "message_type": "audio", "content": "audios/missing.wav"}
            ],
        }
    )
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        sft_codes.extract(lines, tok, FIX / "training", offset=h.OFFSET)
    got, bad = sft_codes.extract(lines, tok, FIX / "training", offset=h.OFFSET, skip_bad=True)
    assert got == want and [i for i, _ in bad] == [4]


# -- TFDS ------------------------------------------------------------------------------------------


def test_tfds_builder_and_source_give_the_prepared_records(tmp_path):
    """KimiaPrepared (file_format=array_record, no TensorFlow) over a prepared folder; TfdsSource
    reads it back (by name, from data_dir) as the same records ArrayRecordSource gives."""
    from data.pipeline import shard_files
    from data.tfds_builder import KimiaPrepared
    from kimia_jax.training import data as tdata

    prepared = tmp_path / "prepared"
    recs = {
        "pt_docs": [
            {"doc_id": f"d{i}", "chunk_index": np.int32(0), "source": "s",
             "num_segments": np.int32(2), "row_id": [f"r{i}a", f"r{i}b"],
             "seg_start_s": np.array([0, 1], np.float32), "seg_end_s": np.array([1, 2], np.float32),
             "seg_speaker": np.zeros(2, np.int32), "seg_lang": ["en", "zh"],
             "seg_lang_prob": np.ones(2, np.float32), "seg_has_text": np.array([True, False]),
             "text": ["hi", ""], "text_ids_flat": np.array([5, 6], np.int32),
             "text_ids_len": np.array([2, 0], np.int32),
             "asr_model": ["manifest", ""], "codes_orig_flat": np.arange(3 + i, dtype=np.uint16),
             "codes_len": np.array([2, 1 + i], np.int32),
             "audio_ref_orig": np.array([[0, 0], [0, 1]], np.int64),
             "num_samples_16k": np.array([2000, 1000], np.int64)}
            for i in range(3)
        ],
        "sft": [{"row_id": "x:1", "task": "asr", "output_type": "text", "messages": [
            {"role": "user", "kind": "audio", "codes": np.arange(4, dtype=np.int32),
             "audio": np.zeros(5000, np.float32)},
            {"role": "assistant", "kind": "text", "text": "hi",
             "text_ids": np.array([1], np.int32)}]}],
    }  # fmt: skip
    files = {}
    for fam, rs in recs.items():
        name = f"{fam}-00000-of-00001.array_record"
        tdata.write_records(prepared / name, rs)
        files[fam] = [{"file": name, "records": len(rs)}]
    (prepared / "index.json").write_text(json.dumps({"num_shards": 1, "files": files}))
    assert shard_files(prepared, "sft") == [str(prepared / "sft-00000-of-00001.array_record")]
    for fam in recs:
        b = KimiaPrepared(config=fam, prepared_dir=str(prepared), data_dir=str(tmp_path / "tfds"))
        b.download_and_prepare(file_format="array_record")
        got = sorted(tdata.TfdsSource(f"kimia_prepared/{fam}", data_dir=tmp_path / "tfds"),
                     key=lambda r: r.get("doc_id", r.get("row_id")))  # fmt: skip
        assert len(got) == len(recs[fam])
        for g, w in zip(got, recs[fam], strict=True):
            assert g.keys() == w.keys()
            for k in w:
                if fam == "sft" and k == "messages":
                    for gm, wm in zip(g[k], w[k], strict=True):
                        assert gm.keys() == wm.keys()
                        for kk in wm:
                            np.testing.assert_array_equal(gm[kk], wm[kk])
                else:
                    np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    with pytest.raises(FileNotFoundError, match="no TFDS dataset"):
        tdata.TfdsSource("kimia_prepared/audio", data_dir=tmp_path / "tfds")

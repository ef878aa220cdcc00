"""Scoring parity with Kimi-Audio-Evalkit 4080c49 on every fixture item (tests/fixtures/evaluation,
copied from shared/fixtures/evaluation; README there). Measured: exact equality everywhere (488 ASR
items x every stage, 10 wer_details files, 10 ASR + 20 classification performance entries incl.
vb-ifeval, 341 classification items incl. judge prompt sha256 and the 59 IFEval follow lists, 17
judge dumps, 4 report files byte for byte); the crash inputs give a result plus note lines."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kimia_jax.evaluation import asr, benchmarks, judged, results, scoring

F = Path(__file__).parents[1] / "fixtures" / "evaluation"
ASR, CLS = F / "asr", F / "classification"
DATE = "2025-01-01 00:00:00"
SEED = json.loads((F / "provenance.json").read_text())["vb_mcq_random_seed"]
RULE = {
    "Kimi-Audio_mmsu.jsonl": "vb-mcq",
    "Kimi-Audio_openbookqa.jsonl": "vb-mcq",
    "VB-MCQ_MELD.jsonl": "vb-mcq",
    "Kimi-Audio_advbench.jsonl": "vb-advbench",
    "Kimi-Audio_ifeval.jsonl": "vb-ifeval",
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def replay(name: str):
    """The canned replies of judge_replies/<file>.json, by row index; {"__raise__"} = failure."""
    p = CLS / "judge_replies" / name.replace(".jsonl", ".json")
    replies = json.loads(p.read_text()) if p.exists() else []

    def judge(requests):
        out = []
        for r in requests:
            x = replies[int(r.key[2])]
            out.append(None if isinstance(x, dict) else x)
        return out

    return judge


def test_asr_every_stage_of_every_item():
    n = 0
    for it in _jsonl(ASR / "expected_items.jsonl"):
        if it["dropped"]:
            continue
        for side, key in (("answer", "ref_stages"), ("prediction", "hyp_stages")):
            text = it.get(f"{side}_as_read", it[side])
            assert asr.normalize_stages(text, it["lang"]) == it[key], (it["file"], it["index"])
        ref = it["ref_stages"]["tokens"]
        assert len(ref) == it["ref_len"]
        n += 1
    assert n > 400


def test_asr_values_as_read_reproduce_pandas_coercion():
    by_file: dict[str, list[dict]] = {}
    for it in _jsonl(ASR / "expected_items.jsonl"):
        by_file.setdefault(it["file"], []).append(it)
    for name, its in by_file.items():
        rows = results.read_results(ASR / "results" / name)
        by_idx = {(r["subset"], str(r["index"])): r for r in rows}
        for it in its:
            r = by_idx[(it["subset"], str(it["index"]))]
            assert results.as_str(r["answer"]) == it.get("answer_as_read", it["answer"])
            assert results.as_str(r["prediction"]) == it.get("prediction_as_read", it["prediction"])


@pytest.mark.parametrize("path", sorted((ASR / "results").glob("*.jsonl")), ids=lambda p: p.stem)
def test_asr_performance_and_wer_details(path):
    expected = json.loads((ASR / "expected_performance.json").read_text())
    ds = None
    if "Yue-Demo" in path.name:  # the fixtures' Cantonese set: not in the Evalkit's registry
        ds = benchmarks.Benchmark("Yue-Demo", "ASR", "Audio-analysis", lang="yue")
    ev = scoring.score_file(path, dataset=ds, date=DATE)
    if path.name in expected:
        assert ev.performance == expected[path.name]
        assert not ev.notes
        want = _jsonl(ASR / "expected_wer_details" / ev.dump_name)
        assert json.loads(json.dumps(ev.dump)) == want
        items = [it for it in _jsonl(ASR / "expected_items.jsonl") if it["file"] == path.name]
        got = {(r["subset"], str(r["index"])): r["wer_details"] for r in ev.dump}
        for it in items:
            want_d = None if it["dropped"] else it["edit_distance"]
            assert got[(it["subset"], str(it["index"]))] == want_d
    else:  # the Evalkit raises on these: we give a result and a note line
        assert path.name in json.loads((ASR / "expected_errors.json").read_text())
        assert ev.notes and all(n.startswith("note: ") for n in ev.notes)
        perf = ev.performance["performance"]
        if "AllNull" in path.name:
            assert any(v == {"wer": None, "total": 0} for v in perf.values())
            assert "ZeroDivisionError" in " ".join(ev.notes)
        else:
            assert all(isinstance(v["wer"], float) for v in perf.values())
            assert "IndexError" in " ".join(ev.notes)


def _cls_items():
    out: dict[str, list[dict]] = {}
    for it in _jsonl(CLS / "expected_items.jsonl"):
        out.setdefault(it["file"], []).append(it)
    return out


@pytest.mark.parametrize(
    "path",
    sorted((CLS / "results").glob("*.jsonl")),
    ids=lambda p: p.stem,
)
def test_classification_items_performance_and_dumps(path):
    expected = json.loads((CLS / "expected_performance.json").read_text())
    method = RULE.get(path.name, "default")
    ev = scoring.score_file(path, method, judge=replay(path.name), seed=SEED, date=DATE)
    if path.name not in expected:  # JudgeFailure / RatingOutOfRange: result + note
        assert path.name in json.loads((CLS / "expected_errors.json").read_text())
        assert ev.notes and ev.performance["performance"]
        return
    assert ev.performance == expected[path.name]
    got = {(i["subset"], str(i["index"])): i for i in ev.items}
    want_items = _cls_items()[path.name]
    assert want_items
    for it in want_items:
        if it.get("skipped_subset"):
            assert (it["subset"], str(it["index"])) not in got
            continue
        g = got[(it["subset"], str(it["index"]))]
        keys = (
            "extracted",
            "random_fallback",
            "refused",
            "matched_phrases",
            "parsed",
            "response_used",
            "strict_follow",
            "strict_all",
            "loose_follow",
            "loose_all",
        )
        for k in keys:
            if k in it:
                assert g[k] == it[k], (it["index"], k)
        if "judge_prompt_sha256" in it:
            sha = hashlib.sha256(g["judge_prompt"].encode("utf-8")).hexdigest()
            assert sha == it["judge_prompt_sha256"], it["index"]
            assert g["judge_request"] == it["judge_request"]
            assert g["judge_reply"] == (it["judge_reply"].strip())
    dump = CLS / "expected_judge_outputs" / ev.dump_name
    if method == "vb-ifeval":  # the Evalkit raises before writing one; ours: rows + verdicts
        assert not dump.exists() and len(ev.dump) == len(want_items)
        assert any("ValueError" in n for n in ev.notes)
    else:
        assert json.loads(json.dumps(ev.dump)) == _jsonl(dump)


def test_judge_prompt_examples_byte_identical():
    for ex in json.loads((CLS / "judge_prompt_examples.json").read_text()):
        path = CLS / "results" / ex["file"]
        ev = scoring.score_file(path, judge=replay(ex["file"]), date=DATE)
        got = {(i["subset"], str(i["index"])): i["judge_prompt"] for i in ev.items}
        assert got[(ex["subset"], str(ex["index"]))] == ex["prompt"]


@pytest.mark.parametrize("name", sorted(p.name for p in (F / "report").glob("*.json")))
def test_report_files_byte_for_byte(name, tmp_path):
    model_ds, method = name.removesuffix("_performance.json").rsplit("_", 1)
    folder = ASR if "LibriSpeech" in name else CLS
    res = folder / "results" / f"{model_ds}.jsonl"
    ev = scoring.score_file(res, method, judge=replay(res.name), seed=SEED, date=DATE)
    assert scoring.performance_name(res, method) == name
    out = tmp_path / name
    scoring.write_performance(out, ev.performance)
    assert out.read_bytes() == (F / "report" / name).read_bytes()


def test_vendored_constants_match_the_fixtures():
    assert judged.judge_templates() == json.loads((CLS / "judge_templates.json").read_text())
    assert judged.advbench_refusals() == json.loads(
        (CLS / "advbench_refusal_strings.json").read_text()
    )
    t = judged.vb_mcq_templates()
    assert len(t) == 163 and len(set(t)) == 162


def test_registry_prompts_and_decoding_match_prompts_json():
    p = json.loads((F / "prompts.json").read_text())
    assert benchmarks.kimi_audio_sampling() == p["kimi_audio"]["sampling_params"]
    assert benchmarks.duration_filter() == (0.1, 60.0)
    for e in p["datasets"]:
        b = benchmarks.get(e["DATASET_NAME"])
        assert (b.task, b.interactive, b.lang, b.question) == (
            e["TASK"],
            e["INTERACTIVE"],
            e["LANG"],
            e["question"],
        )
    assert benchmarks.get("librispeech").paper == {"test_clean": 1.28, "test_other": 2.42}
    assert [b.name for b in benchmarks.select("asr")][:2] == ["LibriSpeech", "Fleurs-en"]
    assert len(benchmarks.registry()) == 21


def test_strict_mode_fixes_documented_bugs():
    assert judged.is_refusal("i\u2019m sorry, no", strict=True)
    assert not judged.is_refusal("i\u2019m sorry, no")
    zh = asr.tokens("一共５０块", "zh", strict=True)
    assert zh == asr.tokens("一共50块", "zh") and zh != asr.tokens("一共５０块", "zh")


def test_oab_never_evaluates_judge_text():
    assert judged.parse_oab("trivia_qa", "{'judgment': 'Correct'}") == "correct"
    assert judged.parse_oab("trivia_qa", '{"judgment": "correct", "x": null}') == "invalid"
    assert judged.parse_oab("trivia_qa", "{'judgment': 'correct'.upper()}") == "unsafe"
    assert judged.parse_oab("alpaca_eval", "[[11]]") == "out_of_range"


def test_numeric_columns_coerced_like_pandas_and_kept_in_strict_mode(tmp_path):
    p = tmp_path / "M_LibriSpeech.jsonl"
    rows = [{"index": "0", "answer": "007", "prediction": "1.50", "subset": "a"},
            {"index": "1", "answer": "3", "prediction": " 2 ", "subset": "a"}]  # fmt: skip
    p.write_text("\n".join(json.dumps(r) for r in rows))
    read = results.read_results(p)
    assert [r["index"] for r in read] == [0, 1]  # MELD-style string ids become ints
    assert [results.as_str(r["answer"]) for r in read] == ["7", "3"]  # all integral: int64
    assert [results.as_str(r["prediction"]) for r in read] == ["1.5", "2.0"]  # float64
    strict = results.read_results(p, strict=True)
    assert [r["answer"] for r in strict] == ["007", "3"]
    rows[1]["prediction"] = "null"  # one non-numeric value keeps the whole column as text
    p.write_text("\n".join(json.dumps(r) for r in rows))
    assert [r["prediction"] for r in results.read_results(p)] == ["1.50", "null"]

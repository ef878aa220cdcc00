"""Benchmark registry: every dataset of the Kimi-Audio report's tables (spec/evaluation.md 1.3-1.4).

The per-dataset facts (task, interactive type, language, the exact manifest `question` the Evalkit's
downloader writes = what Kimi-Audio receives, default and paper judge method) come from
`data/prompts.json`, read from the Evalkit (commit 4080c49) with `ast`; the decoding settings
(`kimi_audio_sampling`) and the 60 s / 0.1 s duration filter likewise. Paper numbers: the report
Tables 4-6 (= the Evalkit LEADERBOARD), keyed by (dataset, subset).

Manifests: the Evalkit's jsonl (`index`, `audio_path`, `question`, `answer`, `subset`, ...) or a
plain jsonl with `id`/`audio` (+ optional `question`, `answer`, `subset`); `read_manifest` accepts
both and returns Evalkit-shaped records.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from kimia_jax.errors import ManifestError
from kimia_jax.evaluation.results import iter_jsonl


@functools.cache
def _prompts() -> dict[str, Any]:
    text = resources.files("kimia_jax.evaluation").joinpath("data", "prompts.json").read_text()
    return json.loads(text)


def kimi_audio_sampling() -> dict[str, Any]:
    """The exact `sampling_params` the Evalkit passes to `KimiAudio.generate`."""
    return dict(_prompts()["kimi_audio"]["sampling_params"])


def duration_filter() -> tuple[float, float]:
    """(min, max) audio seconds; items outside are skipped (prediction `"null"` at merge)."""
    f = _prompts()["kimi_audio"]["audio_duration_filter_s"]
    return float(f["min"]), float(f["max"])


def judge_settings() -> dict[str, Any]:
    return dict(_prompts()["judge"])


# Paper numbers for Kimi-Audio, report Tables 4-6 (spec 1.3/1.4), by (dataset, subset).
PAPER = {
    ("LibriSpeech", "test_clean"): 1.28,
    ("LibriSpeech", "test_other"): 2.42,
    ("Fleurs-zh", "fleurs_cmn_hans_cn"): 2.69,
    ("Fleurs-en", "fleurs_en_us"): 4.44,
    ("AISHELL-1", "aishell1_test"): 0.60,
    ("AISHELL-2", "aishell2_test"): 2.56,
    ("WenetSpeech", "test_meeting"): 6.28,
    ("WenetSpeech", "test_net"): 5.37,
    ("mmau-test-mini", "music"): 61.68,
    ("mmau-test-mini", "sound"): 73.27,
    ("mmau-test-mini", "speech"): 60.66,
    ("ClothoAQA", "test"): 71.24,
    ("ClothoAQA", "val"): 73.18,
    ("VocalSound", "voice_classification"): 94.85,
    ("Nonspeech7k", "https://freesound.org/"): 93.93,
    ("MELD", "emotion"): 59.13,
    ("TUT2017", "acoustic_scene_classification"): 65.25,
    ("CochlScene", "Test"): 79.84,
    ("CochlScene", "Val"): 80.99,
    ("OpenAudioBench", "alpaca_eval"): 75.73,
    ("OpenAudioBench", "llama_questions"): 79.33,
    ("OpenAudioBench", "reasoning_qa"): 58.02,
    ("OpenAudioBench", "trivia_qa"): 62.10,
    ("OpenAudioBench", "web_questions"): 70.20,
    ("alpacaeval_full", "alpacaeval_full"): 4.46,
    ("commoneval", "commoneval"): 3.97,
    ("sd-qa", "sd-qa"): 63.12,
    ("mmsu", "mmsu"): 62.17,
    ("openbookqa", "openbookqa"): 83.52,
    ("ifeval", "ifeval"): 61.10,
    ("advbench", "advbench"): 100.00,
}
PAPER_VOICEBENCH_AVG = 76.93

# Registry keys accepted by --benchmarks besides DATASET_NAMEs (lower-case aliases and groups).
GROUPS = {
    "asr": ["LibriSpeech", "Fleurs-en", "Fleurs-zh", "AISHELL-1", "AISHELL-2", "WenetSpeech"],
    "mqa": [
        "mmau-test-mini",
        "MELD",
        "VocalSound",
        "Nonspeech7k",
        "TUT2017",
        "CochlScene",
        "mmsu",
        "openbookqa",
    ],
    "refqa": ["ClothoAQA", "sd-qa", "OpenAudioBench"],
    "voicebench": [
        "alpacaeval_full",
        "commoneval",
        "sd-qa",
        "mmsu",
        "openbookqa",
        "ifeval",
        "advbench",
    ],
}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One Evalkit dataset: how Kimi-Audio is prompted on it and how it is scored."""

    name: str
    task: str  # ASR | MQA | Ref-QA | Open-Ended
    interactive: str  # Audio-analysis (question text + audio) | Audio-QA (question spoken)
    series: str = ""
    lang: str | None = None
    question: str | None = None  # the manifest question; None = per item from the data
    judge_template: str | None = None
    default_method: str = "gpt-4o-mini"  # qwen2-audio-impl for ASR
    paper_method: str = "gpt-4o-mini"  # the method behind the paper's number
    paper: dict[str, float] = dataclasses.field(default_factory=dict)  # subset -> report number

    @property
    def judged(self) -> bool:
        return self.paper_method not in ("qwen2-audio-impl", "vb-advbench", "vb-ifeval")

    @property
    def lower_is_better(self) -> bool:
        return self.task == "ASR"


@functools.cache
def registry() -> dict[str, Benchmark]:
    out = {}
    for e in _prompts()["datasets"]:
        name = e["DATASET_NAME"]
        asr = e["TASK"] == "ASR"
        default = "qwen2-audio-impl" if asr else e["eval_method_default"]
        out[name] = Benchmark(
            name=name,
            task=e["TASK"],
            interactive=e["INTERACTIVE"],
            series=e["DATASET_SERIES"],
            lang=e["LANG"],
            question=e["question"],
            judge_template=e.get("judge_template"),
            default_method=default,
            paper_method=e.get("paper_method", default),
            paper={s: v for (d, s), v in PAPER.items() if d == name},
        )
    return out


def get(name: str) -> Benchmark:
    reg = registry()
    if name in reg:
        return reg[name]
    folded = {k.lower(): k for k in reg}
    if name.lower() in folded:
        return reg[folded[name.lower()]]
    raise ManifestError(
        f"unknown benchmark {name!r}; known: {', '.join(sorted(reg))} "
        f"or a group ({', '.join(sorted(GROUPS))})"
    )


def select(spec: str) -> list[Benchmark]:
    """`--benchmarks` value: comma-separated names and groups (`all` = every registered set)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "all":
            names.extend(registry())
        elif part.lower() in GROUPS:
            names.extend(GROUPS[part.lower()])
        else:
            names.append(get(part).name)
    if not names:
        raise ManifestError("--benchmarks is empty: give names like LibriSpeech,mmsu or a group")
    return [registry()[n] for n in dict.fromkeys(names)]


def dataset_of_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(model, dataset) from an Evalkit result file name `<model>_<DATASET>.jsonl`
    (`get_model_name`: the part before `_<DATASET>`)."""
    stem = Path(path).name.removesuffix(".jsonl")
    for name in sorted(registry(), key=len, reverse=True):
        if stem.endswith("_" + name):
            return stem[: -len(name) - 1], name
    if "_" in stem:
        model, ds = stem.split("_", 1)
        return model, ds
    raise ManifestError(f"{path}: result file names are <model>_<DATASET>.jsonl")


def manifest_path(root: str | os.PathLike[str], bench: Benchmark) -> Path:
    """The Evalkit's lookup: <root>/<NAME>/<NAME>.jsonl, <root>/<SERIES>/<NAME>.jsonl,
    <root>/<SERIES>/<NAME>/<NAME>.jsonl, then <root>/<NAME>.jsonl."""
    root = Path(root)
    n, s = bench.name, bench.series
    for p in (
        root / n / f"{n}.jsonl",
        root / s / f"{n}.jsonl",
        root / s / n / f"{n}.jsonl",
        root / f"{n}.jsonl",
    ):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"--data_dir {root}: no manifest for {n} (looked for {n}/{n}.jsonl, "
        f"{s}/{n}.jsonl, {s}/{n}/{n}.jsonl, {n}.jsonl)"
    )


def read_manifest(path: str | os.PathLike[str], bench: Benchmark) -> list[dict[str, Any]]:
    """Evalkit records (index, audio_path absolute, question, answer, subset, extras kept).

    Plain jsonl rows `{"id", "audio", ...}` are accepted too: `id` -> index, `audio` ->
    audio_path, `question` defaults to the benchmark's instruction, `subset` to the name."""
    path = Path(path)
    out, seen = [], set()
    for n, row in iter_jsonl(path, "a manifest row"):
        row = dict(row)
        if "index" not in row and "id" in row:
            row["index"] = row.pop("id")
        if "audio_path" not in row and "audio" in row:
            row["audio_path"] = row.pop("audio")
        for field in ("index", "audio_path"):
            if field not in row:
                raise ManifestError(f"{path}:{n}: missing {field!r} (or plain 'id'/'audio')")
        if isinstance(row["audio_path"], list) and len(row["audio_path"]) != 1:
            raise ManifestError(f"{path}:{n}: Kimi-Audio takes exactly one audio per item")
        if row.get("question") is None:
            if bench.question is None:
                raise ManifestError(f"{path}:{n}: {bench.name} items carry their own question")
            row["question"] = bench.question
        row.setdefault("answer", "")
        row.setdefault("subset", bench.name)
        key = str(row["index"])
        if key in seen:
            raise ManifestError(f"{path}:{n}: index {key!r} repeats")
        seen.add(key)
        ap = row["audio_path"]
        ap = ap[0] if isinstance(ap, list) else ap
        if not os.path.isabs(ap):
            row["audio_path"] = str(path.parent / ap)
        out.append(row)
    return out

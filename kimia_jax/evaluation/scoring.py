"""`score_file`: one merged result file -> the Evalkit's performance dict, dump file and notes.

Dispatch follows the Evalkit's `<Dataset>.evaluate(eval_file, method)`: ASR always
`qwen2-audio-impl`; `vb-mcq`, `vb-advbench` rule-based; `default`/`gpt-4o-mini`/`gpt-4o` judged with
the dataset's template. File names and formats as run_audio.py writes them (spec section 4.2).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

from kimia_jax.evaluation import asr, benchmarks, judged
from kimia_jax.evaluation.results import dump_rows, read_results

RULE_METHODS = ("vb-mcq", "vb-advbench", "vb-ifeval")
JUDGE_METHODS = ("default", "gpt-4o-mini", "gpt-4o")


@dataclasses.dataclass
class Evaluation:
    performance: dict[str, Any]  # {task, dataset, model, date, performance, eval_method}
    dump_name: str  # file name of the dump next to the result file
    dump: list[dict[str, Any]]
    items: list[dict[str, Any]]
    notes: list[str]
    method: str  # the requested method (goes into the performance file name)


def format_performance(
    bench: benchmarks.Benchmark, model: str, metrics: dict, eval_method: str, date: str | None
) -> dict[str, Any]:
    return {
        "task": bench.task,
        "dataset": bench.name,
        "model": model,
        "date": date if date is not None else str(datetime.datetime.now()),
        "performance": metrics,
        "eval_method": eval_method,
    }


def score_file(
    result_file: str | os.PathLike[str],
    method: str = "default",
    *,
    judge: judged.Judge | None = None,
    judge_model: str = "gpt-4o-mini",
    seed: int = 0,
    strict: bool = False,
    dataset: str | benchmarks.Benchmark | None = None,
    model: str | None = None,
    date: str | None = None,
) -> Evaluation:
    """Scores one `<model>_<DATASET>.jsonl`. `judge` answers judge requests (an HTTP client,
    a cache, a replay); needed only for judged methods. `dataset` overrides the name read from
    the file name; a `Benchmark` scores a set the registry does not know."""
    fmodel, fdataset = benchmarks.dataset_of_file(result_file)
    if isinstance(dataset, benchmarks.Benchmark):
        bench = dataset  # a dataset outside the registry (e.g. a Cantonese set, lang "yue")
    else:
        bench = benchmarks.get(dataset or fdataset)
    model = model if model is not None else fmodel
    rows = read_results(result_file, strict=strict)
    stem = Path(result_file).name.removesuffix(".jsonl")
    ds = bench.name
    if bench.task == "ASR":
        s = asr.score_asr(rows, bench.lang, dataset=ds, strict=strict)
        dump = [{**r, "wer_details": d} for r, d in zip(rows, s.details, strict=True)]
        perf = format_performance(bench, model, s.metrics, "qwen2-audio-impl", date)
        return Evaluation(perf, f"{stem}_wer_details.jsonl", dump, [], s.notes, method)
    if method == "vb-mcq":
        if bench.task != "MQA":
            raise ValueError(
                f"--method vb-mcq scores multiple-choice sets, not {ds} ({bench.task})"
            )
        sc = judged.score_vb_mcq(rows, dataset=ds, seed=seed, strict=strict)
        judge_name, eval_method = "vb-mcq", "vb-mcq"
    elif method == "vb-advbench":
        if bench.task != "Open-Ended":
            raise ValueError(f"--method vb-advbench scores open-ended sets, not {ds}")
        sc = judged.score_vb_advbench(rows, dataset=ds, strict=strict)
        judge_name, eval_method = "vb-advbench", "vb-advbench"
    elif method == "vb-ifeval":
        if bench.task != "Open-Ended":
            raise ValueError(f"--method vb-ifeval scores the IFEval set, not {ds}")
        sc = judged.score_vb_ifeval(rows, dataset=ds, strict=strict)
        judge_name, eval_method = "vb-ifeval", "vb-ifeval"
    elif method in JUDGE_METHODS:
        if judge is None:
            raise ValueError(
                f"{ds} with method {method!r} needs a judge (an OpenAI-compatible "
                "endpoint: --judge_base_url, or --judge_cache in replay mode)"
            )
        eval_method = "gpt-4o-mini" if method == "default" else method
        judge_name = judge_model if method == "default" else method
        if bench.name == "OpenAudioBench":
            sc = judged.score_openaudiobench(rows, judge, dataset=ds)
        elif bench.task == "Open-Ended":
            sc = judged.score_open_ended(rows, judge, interactive=bench.interactive, dataset=ds)
        else:
            tid = {"MQA": judged.SINGLE_CHOICE, "Ref-QA": judged.REF_QA}[bench.task]
            if ds == "sd-qa":
                tid = judged.SD_QA
            sc = judged.score_yes_no(
                rows,
                judge,
                template_id=tid,
                interactive=bench.interactive,
                dataset=ds,
                skip_sentiment=bench.task == "MQA",
                strict=strict,
            )
    else:
        raise ValueError(
            f"unknown --method {method!r} (one of default, gpt-4o-mini, gpt-4o, "
            "vb-mcq, vb-advbench, vb-ifeval; ASR ignores it)"
        )
    perf = format_performance(bench, model, sc.metrics, eval_method, date)
    return Evaluation(perf, f"{stem}_{judge_name}_judge.jsonl", sc.dump, sc.items, sc.notes, method)


def performance_name(result_file: str | os.PathLike[str], method: str) -> str:
    return Path(result_file).name.removesuffix(".jsonl") + f"_{method}_performance.json"


def write_performance(path: str | os.PathLike[str], performance: dict[str, Any]) -> None:
    """`json.dump(perf, f, indent=4)` as run_audio.py: ASCII-escaped, no trailing newline."""
    with open(path, "w") as f:
        json.dump(performance, f, indent=4)


def write_outputs(result_file: str | os.PathLike[str], ev: Evaluation) -> dict[str, Path]:
    """The performance file and the dump next to the result file (names as the Evalkit's)."""
    folder = Path(result_file).parent
    perf = folder / performance_name(result_file, ev.method)
    write_performance(perf, ev.performance)
    dump = folder / ev.dump_name
    dump_rows(dump, ev.dump)
    return {"performance": perf, "dump": dump}

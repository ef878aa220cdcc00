"""Summary table and plot: our numbers beside the Kimi-Audio report's, per benchmark and subset.

`table_rows(performances)` flattens the Evalkit performance dicts into rows (benchmark, subset,
metric, ours, paper, delta); `voicebench_avg` derives the report's VoiceBench "Avg" (spec 4.4: the
mean of AlpacaEval x20, CommonEval x20, SD-QA, MMSU, OpenBookQA, IFEval, AdvBench);
`write_markdown` and `write_plot` (matplotlib, Agg backend, PNG) write the report files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kimia_jax.evaluation import benchmarks

_METRICS = ("wer", "acc", "score", "final")
VOICEBENCH_AVG_PARTS = (
    "alpacaeval_full",
    "commoneval",
    "sd-qa",
    "mmsu",
    "openbookqa",
    "ifeval",
    "advbench",
)


def _metric(entry: Mapping[str, Any]) -> tuple[str, Any]:
    for m in _METRICS:
        if m in entry:
            return m, entry[m]
    return "?", None


def table_rows(performances: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, subset) of the Evalkit performance dicts."""
    rows = []
    for perf in performances:
        name = perf["dataset"]
        reg = benchmarks.registry().get(name)
        for subset, entry in perf["performance"].items():
            metric, ours = _metric(entry)
            if metric == "final" and ours is not None:
                ours = round(100 * ours, 2)  # vb-ifeval fractions; the paper shows percent
            paper = reg.paper.get(subset) if reg else None
            ok = isinstance(ours, (int, float)) and math.isfinite(ours)
            delta = round(ours - paper, 2) if ok and paper is not None else None
            rows.append(
                {
                    "benchmark": name,
                    "subset": subset,
                    "metric": metric,
                    "ours": ours,
                    "paper": paper,
                    "delta": delta,
                    "method": perf.get("eval_method"),
                    "lower_is_better": metric == "wer",
                }
            )
    return rows


def voicebench_avg(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The report's VoiceBench Avg from our rows; None unless all seven parts have a number."""
    vals = {r["benchmark"]: r["ours"] for r in rows if r["benchmark"] in VOICEBENCH_AVG_PARTS}
    if set(vals) != set(VOICEBENCH_AVG_PARTS) or any(v is None for v in vals.values()):
        return None
    parts = [v * 20 if k in ("alpacaeval_full", "commoneval") else v for k, v in vals.items()]
    return round(sum(parts) / len(parts), 2)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = (), title: str = "") -> str:
    lines = [f"# {title}" if title else "# Evaluation", ""]
    lines.append("| benchmark | subset | metric | ours | paper (Kimi-Audio) | delta | method |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        arrow = " (lower is better)" if r["lower_is_better"] else ""
        lines.append(
            f"| {r['benchmark']} | {r['subset']} | {r['metric']}{arrow} | "
            f"{_fmt(r['ours'])} | {_fmt(r['paper'])} | {_fmt(r['delta'])} | "
            f"{r['method']} |"
        )
    avg = voicebench_avg(rows)
    if avg is not None:
        lines.append(
            f"| VoiceBench | Avg | derived | {avg:.2f} | "
            f"{benchmarks.PAPER_VOICEBENCH_AVG:.2f} | "
            f"{avg - benchmarks.PAPER_VOICEBENCH_AVG:.2f} | |"
        )
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | os.PathLike[str], rows, notes=(), title: str = "") -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(rows, notes, title))


def write_plot(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], title: str = ""):
    """Grouped bars: ours vs the paper per (benchmark, subset); WER panels apart (lower is
    better). Rows without a number are drawn as gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        ("WER % (lower is better)", [r for r in rows if r["metric"] == "wer"]),
        ("accuracy / score (higher is better)", [r for r in rows if r["metric"] != "wer"]),
    ]
    groups = [(t, g) for t, g in groups if g] or [("no results", [])]
    size = (max(6.0, 0.9 * len(rows) + 2), 4.5 * len(groups))
    fig, axes = plt.subplots(len(groups), 1, figsize=size, squeeze=False)
    for ax, (label, g) in zip(axes[:, 0], groups, strict=True):
        xs = range(len(g))
        ours = [r["ours"] if isinstance(r["ours"], (int, float)) else math.nan for r in g]
        paper = [r["paper"] if r["paper"] is not None else math.nan for r in g]
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="ours")
        ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper (Kimi-Audio)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(
            [f"{r['benchmark']}\n{r['subset']}" for r in g], rotation=30, ha="right", fontsize=8
        )
        ax.set_ylabel(label)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)

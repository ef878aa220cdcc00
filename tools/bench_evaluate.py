"""Evaluation throughput (items/s): our batched runner vs the Evalkit's one-request-at-a-time loop.

    python -m tools.bench_evaluate                     # tiny model, 16 items, batch 8
    python -m tools.bench_evaluate --model_path /data/kimia-orbax --items 64 --max_new_tokens -1

Same manifest (the bundled clips in experiments/assets, repeated, with the Evalkit's LibriSpeech
instruction), same model, same decoding settings (the Evalkit's: greedy text, repetition penalty
1.1 / 16), measured in one run:

* official loop: what run_audio.py does per rank: for each item, the 60 s duration check, then one
  `generate(messages)` call (batch 1), one item after another;
* ours: `experiments.evaluate`'s path: the duration check per item, then `inference.batch.run`
  (`generate_batch`, `--batch` items per compiled call) appending each batch to the results jsonl.

Each side runs the manifest twice: the first pass includes compilation (what a short run sees),
the second is warm. The predictions of both sides are compared (greedy: they must agree).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from absl import app, flags

from kimia_jax.evaluation import benchmarks, runner

_MODEL = flags.DEFINE_string("model_path", None, "Model folder (default: a fresh tiny model).")
_ITEMS = flags.DEFINE_integer("items", 16, "Manifest items.")
_BATCH = flags.DEFINE_integer("batch", 8, "Items per batched call (ours).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Text token budget per item.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")

ASSETS = Path(__file__).resolve().parents[1] / "experiments" / "assets"
CLIPS = [
    ASSETS / "en_fox_16k.wav",
    ASSETS / "librispeech" / "librispeech_1263-139804-0002.flac",
    ASSETS / "librispeech" / "librispeech_1263-139804-0005.flac",
    ASSETS / "kimi_qa_example.wav",
]


def manifest(n: int) -> list[dict]:
    q = benchmarks.get("LibriSpeech").question
    return [{"index": i, "audio_path": str(CLIPS[i % len(CLIPS)]), "question": q,
             "answer": "", "subset": "test_clean"} for i in range(n)]  # fmt: skip


def official_loop(model, rows, sampling) -> tuple[float, dict[str, str]]:
    out, t0 = {}, time.perf_counter()
    for row in rows:
        if runner.outside_duration(row["audio_path"]) is not None:
            continue
        _, text = model.generate(runner.item_messages(row), "text", **sampling)
        out[str(row["index"])] = text
    return time.perf_counter() - t0, out


def batched(model, rows, sampling, log_path: Path) -> tuple[float, dict[str, str]]:
    from kimia_jax.fileio import ResultLog
    from kimia_jax.inference import batch

    t0 = time.perf_counter()
    requests = [
        batch.Request(str(r["index"]), n, messages=runner.item_messages(r))
        for n, r in enumerate(rows)
        if runner.outside_duration(r["audio_path"]) is None
    ]
    log = ResultLog(log_path)
    batch.run(model, requests, log, batch_size=_BATCH.value, sampling=sampling)
    return time.perf_counter() - t0, {k: v["text"] for k, v in log.done.items()}


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.inference.api import KimiAudio

    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    path = _MODEL.value
    if path is None:
        from kimia_jax.testing import tiny_kimia

        path = tiny_kimia.write(tmp / "tiny", dtype="float32", detokenizer=False)
    model = KimiAudio(path, load_detokenizer=False, dtype=_DTYPE.value, max_batch=_BATCH.value)
    sampling = {**benchmarks.kimi_audio_sampling(), "max_new_tokens": _MAX_NEW.value}
    rows = manifest(_ITEMS.value)
    res = {}
    for name in ("official", "ours"):
        for p in ("cold", "warm"):
            if name == "official":
                s, texts = official_loop(model, rows, sampling)
            else:
                s, texts = batched(model, rows, sampling, tmp / f"{p}.jsonl")
            res[(name, p)] = (s, texts)
            print(f"{name:8s} {p}: {len(rows)} items in {s:7.2f}s = {len(rows) / s:6.2f} items/s")
    same = res[("official", "warm")][1] == res[("ours", "warm")][1]
    for p in ("cold", "warm"):
        ratio = res[("official", p)][0] / res[("ours", p)][0]
        print(f"speed-up {p}: {ratio:.2f}x (batch {_BATCH.value})")
    print(f"predictions identical: {same}; cpu cores: {os.cpu_count()}; model: {path}")


if __name__ == "__main__":
    app.run(main)

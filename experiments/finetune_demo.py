"""`make finetune-demo`: fine-tune the tiny model on real LibriSpeech clips until greedy ASR
through `KimiAudio` returns the reference transcripts.

    python -m experiments.finetune_demo --workdir finetune_demo_out

1. generates the tiny random Kimi-Audio folder (released layout) and measures the WER of greedy
   ASR on the clips of experiments/assets/librispeech (random weights: WER ~1 or more),
2. trains with `python -m experiments.train --config=experiments/configs/tiny_demo.py` (constant
   learning rate after warmup, so each round continues the previous one exactly from its
   checkpoint), `--steps` at a time, until the exported model transcribes every clip exactly
   (or `--max_rounds`),
3. prints WER before / after, steps, seconds, the loss curve's end points and the exported
   checkpoint paths (released layout and Orbax; `KimiAudio` loads both).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging

ASSETS = Path(__file__).parent / "assets" / "librispeech"
INSTRUCTION = "Please transcribe the spoken content into written text."

_WORKDIR = flags.DEFINE_string("workdir", "finetune_demo_out", "Run folder (fresh each time).")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps per round.")
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 6, "Rounds before giving up.")


def transcribe(model_dir: Path) -> dict[str, str]:
    from kimia_jax.inference.api import KimiAudio

    model = KimiAudio(model_dir, load_detokenizer=False, dtype="float32")
    refs = json.loads((ASSETS / "transcripts.json").read_text())
    chats = [
        [
            {"role": "user", "message_type": "text", "content": INSTRUCTION},
            {"role": "user", "message_type": "audio", "content": str(ASSETS / name)},
        ]
        for name in sorted(refs)
    ]
    out = model.generate_batch(chats, "text", max_new_tokens=160)
    return {name: text for name, (_, text) in zip(sorted(refs), out, strict=True)}


def wer(hyps: dict[str, str]) -> float:
    import jiwer

    refs = json.loads((ASSETS / "transcripts.json").read_text())
    names = sorted(refs)
    return float(jiwer.wer([refs[n] for n in names], [hyps[n].strip() for n in names]))


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    import shutil

    from kimia_jax.training.metrics import read_metrics

    work = Path(_WORKDIR.value).absolute()
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/tiny_demo.py",
        f"--workdir={work}",
        "--config.optim.end_lr_ratio=1.0",  # constant after warmup: rounds continue exactly
    ]
    from kimia_jax.testing import tiny_kimia

    # the model experiments.train starts from (it reuses <workdir>/tiny-model when present)
    tiny_kimia.write(work / "tiny-model", seed=0, dtype="float32", detokenizer=False)
    before = transcribe(work / "tiny-model")
    w0 = wer(before)
    print(f"WER before fine-tuning: {w0:.3f}  e.g. {next(iter(before.values()))[:60]!r}")

    steps, w1, after = 0, w0, before
    for _ in range(_MAX_ROUNDS.value):
        steps += _STEPS.value
        subprocess.run([*cmd, f"--config.loop.total_steps={steps}"], check=True)
        after = transcribe(work / "export" / "released")
        w1 = wer(after)
        print(f"after {steps} steps: WER {w1:.3f}")
        if w1 == 0.0:
            break
    curve = read_metrics(work)
    first, last = curve[min(curve)], curve[max(curve)]
    print(
        f"WER before {w0:.3f} -> after {w1:.3f} in {steps} steps, {time.perf_counter() - t0:.0f}s"
    )
    print(f"loss: step {min(curve)} {first['loss']:.4f} -> step {max(curve)} {last['loss']:.4f}")
    for name, text in after.items():
        print(f"  {name}: {text!r}")
    print(f"exported checkpoint: {work / 'export' / 'released'} (released layout), "
          f"{work / 'export' / 'orbax'} (Orbax)")  # fmt: skip
    if w1 != 0.0:
        raise SystemExit(f"WER {w1:.3f} > 0 after {steps} steps")


if __name__ == "__main__":
    app.run(main)

"""What people look at during a run: TensorBoard scalars, a metrics jsonl, a one-line progress
display with ETA (process 0 writes; the others are silent)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Scalars -> TensorBoard event files (tensorboardX) + `metrics.jsonl` in `workdir`.

    The jsonl gets one line per written step ({"step": s, name: value, ...}); a resumed run
    appends, so readers take the last line of each step (`read_metrics`).
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True) -> None:
        self.active = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._tb = None
        self._jsonl = None
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.active:
            return
        vals = {k: float(np.asarray(v)) for k, v in scalars.items()}
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, step)
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": int(step), **vals}) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._tb = self._jsonl = None


def read_metrics(workdir: str | Path) -> dict[int, dict[str, float]]:
    """step -> the last metrics line written for it."""
    out: dict[int, dict[str, float]] = {}
    path = Path(workdir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out[int(d.pop("step"))] = d
    return out


class Progress:
    """`step 12/100 | loss 3.2100 | 1.4 steps/s | 2300 tok/s | data 3% | ETA 0:01:03` on one
    line (carriage return on a terminal, a new line every `every` steps otherwise)."""

    def __init__(self, total: int, start: int = 0, every: int = 10) -> None:
        self.total, self.start, self.every = total, start, every
        self.t0 = time.perf_counter()
        self.tty = sys.stdout.isatty()
        self.active = jax.process_index() == 0

    def update(self, step: int, loss: float, extra: str = "") -> None:
        if not self.active or (not self.tty and step % self.every and step != self.total):
            return
        done = step - self.start
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        line = (
            f"step {step}/{self.total} | loss {loss:.4f} | {rate:.2f} steps/s{extra} | ETA {eta_s}"
        )
        if self.tty:
            print("\r" + line.ljust(100), end="", flush=True)
            if step == self.total:
                print()
        else:
            print(line, flush=True)

"""Per-step cost of sampling + stream bookkeeping at the 7B vocabulary, vs the PyTorch reference.

Ours: one jitted `stream_logic.sample_and_advance` for a batch (both streams sampled, repetition
penalty on, README sampling: text greedy, audio T=0.8 top-k 10), inside `lax.fori_loop` so that
dispatch is not measured. Reference: `KimiASampler` (torch transcription in
tools/reference_loop.py) called per row, B = 1 at a time as the official loop does.

    python -m tools.bench_sampler --batch=1,8 --steps=64

Prints ms per decode step (whole batch) and the ratio reference / ours.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

from kimia_jax.inference import stream_logic as sl
from kimia_jax.inference.sampler import SamplingParams

_BATCH = flags.DEFINE_list("batch", ["1", "8"], "batch sizes")
_STEPS = flags.DEFINE_integer("steps", 64, "decode steps timed")
_VOCAB = flags.DEFINE_integer("vocab", 168448, "vocabulary (7B: 168448)")

TEXT = SamplingParams(temperature=0.0, top_k=5, repetition_penalty=1.1, repetition_window=16)
AUDIO = SamplingParams(temperature=0.8, top_k=10, repetition_penalty=1.1, repetition_window=64)
CFG = sl.StreamConfig("both", text_blank=151666, text_eos=151667, eod_ids=(151645, 151663))


@functools.partial(jax.jit, static_argnames="steps")
def _run(tl, al, key, steps):
    state = sl.StreamState.init(jnp.full((tl.shape[0],), 10**6, jnp.int32), steps)

    def body(i, c):
        state, key = c
        key, sub = jax.random.split(key)
        state, _, _ = sl.sample_and_advance(CFG, state, tl, al, sub, TEXT, AUDIO)
        return state, key

    return jax.lax.fori_loop(0, steps, body, (state, key))[0].audio_history


def _bench_ours(b: int, v: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    tl = jnp.asarray(rng.normal(0, 2, (b, v)).astype(np.float32))
    al = jnp.asarray(rng.normal(0, 2, (b, v)).astype(np.float32))
    _run(tl, al, jax.random.key(0), steps).block_until_ready()  # compile
    t0 = time.perf_counter()
    _run(tl, al, jax.random.key(1), steps).block_until_ready()
    return (time.perf_counter() - t0) / steps


def _bench_reference(b: int, v: int, steps: int) -> float:
    import torch

    from tools.reference_loop import ref_sample

    rng = np.random.default_rng(0)
    tl = torch.from_numpy(rng.normal(0, 2, (b, v)).astype(np.float32))
    al = torch.from_numpy(rng.normal(0, 2, (b, v)).astype(np.float32))
    prev_t = torch.zeros((b, 4096), dtype=torch.int)
    prev_a = torch.zeros((b, 4096), dtype=torch.int)
    kw_t = dict(top_k=5, temperature=0.0, penalty=1.1, window=16)
    kw_a = dict(top_k=10, temperature=0.8, penalty=1.1, window=64)
    t0 = time.perf_counter()
    for i in tqdm(range(steps), desc=f"reference B={b}", leave=False):
        for r in range(b):
            nt = ref_sample(tl[r : r + 1].clone(), prev_t[r, :i] if i > 0 else None, **kw_t)
            na = ref_sample(al[r : r + 1].clone(), prev_a[r, :i] if i > 0 else None, **kw_a)
            prev_t[r, i] = nt
            prev_a[r, i] = 151666 if i < 6 else na
    return (time.perf_counter() - t0) / steps


def main(argv):
    del argv
    v, steps = _VOCAB.value, _STEPS.value
    print(f"device: {jax.devices()[0].device_kind}; vocab {v}; {steps} steps")
    print(f"{'batch':>5} {'ours ms/step':>13} {'reference ms/step':>18} {'ratio':>7}")
    for b in map(int, _BATCH.value):
        ours = _bench_ours(b, v, steps)
        ref = _bench_reference(b, v, steps)
        print(f"{b:>5} {ours * 1e3:>13.2f} {ref * 1e3:>18.2f} {ref / ours:>6.1f}x")


if __name__ == "__main__":
    app.run(main)

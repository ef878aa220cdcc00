"""Unrolled vs scanned LLM layer stack: compile time and decode speed, measured in one run.

    python -m tools.bench_layer_stack                    # 0.5b shape, batch 1 and 8
    python -m tools.bench_layer_stack --sizes=tiny --batch=1

For each layout (`LlmConfig.scan_layers` False / True): the wall time to lower and compile the
whole `generate` call (prefill + decode loop), and decode steps/s of the compiled loop (our
generation runner of tools/bench_generate.py: random weights, "both" output, greedy, no stop).
Also the compile time of a training step's gradient (next-token loss, remat "full") per layout.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import app, flags

from tools.timing import best_of, jax_generate_runner

_SIZES = flags.DEFINE_list("sizes", ["0.5b"], "Model sizes: tiny, 0.5b, 7b.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt length.")
_STEPS = flags.DEFINE_integer("steps", 64, "Decode steps per row.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (best of).")
_GRAD = flags.DEFINE_bool("grad", True, "Also time compiling a remat'd gradient step.")


def _grad_compile_s(cfg, batch: int, length: int) -> float:
    import jax
    import jax.numpy as jnp

    from kimia_jax.models import kimia_llm

    params = jax.eval_shape(lambda: kimia_llm.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(p, ids):
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape)
        o = kimia_llm.KimiaLLM(cfg).apply({"params": p}, ids, ids, pos)
        lp = jax.nn.log_softmax(o.text_logits)
        return -jnp.mean(jnp.take_along_axis(lp[:, :-1], ids[:, 1:, None], axis=-1))

    t0 = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return time.perf_counter() - t0


def main(argv):
    del argv
    import jax

    from kimia_jax import configs

    threads = os.environ.get("XLA_FLAGS", "")
    print(f"jax {jax.__version__} backend={jax.default_backend()} {threads}")
    print(
        f"prompt={_PROMPT.value} steps={_STEPS.value} fp32 greedy 'both', best of {_REPEATS.value}"
    )
    print("| size | layout | batch | compile generate (s) | decode steps/s (all rows) |")
    print("|---|---|---|---|---|")
    grads = []
    for size in _SIZES.value:
        base = configs.PRESETS[size]()
        for scan in (False, True):
            cfg = dataclasses.replace(base, scan_layers=scan)
            layout = "scan" if scan else "unrolled"
            for b in (int(x) for x in _BATCH.value):
                run = jax_generate_runner(cfg, b, _PROMPT.value, _STEPS.value, "both")
                t0 = time.perf_counter()
                run(_STEPS.value + 1)  # compile (+ one run)
                compile_s = time.perf_counter() - t0
                run(1)
                t1 = best_of(lambda: run(1), _REPEATS.value)  # noqa: B023
                tn = best_of(lambda: run(_STEPS.value + 1), _REPEATS.value)  # noqa: B023
                sps = b * _STEPS.value / (tn - t1) if tn > t1 else float("nan")
                print(f"| {size} | {layout} | {b} | {compile_s:.1f} | {sps:.1f} |", flush=True)
            if _GRAD.value:
                gcfg = dataclasses.replace(cfg, remat_policy="full")
                grads.append((size, layout, _grad_compile_s(gcfg, 1, _PROMPT.value)))
    if grads:
        print("\n| size | layout | compile grad, remat full (s) |\n|---|---|---|")
        for size, layout, s in grads:
            print(f"| {size} | {layout} | {s:.1f} |")


if __name__ == "__main__":
    app.run(main)

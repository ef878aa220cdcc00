"""Decode speed and weight bytes of the LLM in fp32, bf16 and int8 weight-only, in one run.

    python -m tools.bench_quant                            # tiny + 0.5b shapes, batch 1 and 8, CPU
    python -m tools.bench_quant --platform=gpu --sizes=0.5b,7b --steps=128
    python -m tools.bench_quant --paper                    # the 7B's weight memory only

Variants (random weights, the compiled dual-stream loop `generate.generate_fixed`, output_type
"both": every layer and both heads run each step, no stop token):
  fp32      fp32 weights, fp32 compute
  bf16      bf16 weights, bf16 compute (the official runtime's dtype)
  int8      int8 weights (`layers.quant.quantize(..., modules=quant.DECODE)`), bf16 compute
  int8_f32  int8 weights, fp32 compute (XLA:CPU has no fast bf16 dot; on CPU this is the fast one)
Decode steps/s = batch * steps / (time(steps + 1) - time(1)) (prefill and compile excluded).
"Bytes read / step": every weight a decode step reads (all layers, both heads; the embedding and
the prompt-only VQ adaptor excluded), i.e. the memory traffic that bounds batch-1 decode; with it
the effective bandwidth at batch 1.

The import chain is jax + flax + absl only (no grain, ml_collections, tensorboardX, librosa,
soundfile; tests/tools/bench_quant_test.py runs it with them blocked), so it runs on a bare
accelerator machine with jax/flax installed; `--platform` sets JAX_PLATFORMS (gpu: cuda) before
jax is imported.
"""

from __future__ import annotations

import os

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["tiny", "0.5b"], "Model sizes: tiny, 0.5b, 7b.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_VARIANTS = flags.DEFINE_list("variants", ["fp32", "bf16", "int8", "int8_f32"], "What to time.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt length.")
_STEPS = flags.DEFINE_integer("steps", 32, "Decode steps per row.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (best of).")
_PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "JAX platform.")
_PAPER = flags.DEFINE_bool("paper", False, "Only print the 7B's weight memory on paper.")

# (dtype of the float weights and of the compute, quantization)
VARIANTS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("bfloat16", "int8"),
    "int8_f32": ("float32", "int8"),
}


def _config(size: str, dtype: str):
    from kimia_jax import configs

    make = {"tiny": configs.tiny, "0.5b": configs.qwen25_05b_shaped, "7b": configs.kimia_7b}
    if size not in make:
        raise app.UsageError(f"--sizes: unknown size {size!r} (tiny, 0.5b, 7b)")
    return make[size](dtype=dtype, param_dtype=dtype)


def params_for(cfg, quantize: str | None):
    import jax

    from kimia_jax.layers import quant
    from kimia_jax.models import kimia_llm

    params = jax.jit(lambda k: kimia_llm.init_params(cfg, k))(jax.random.key(0))
    return quant.quantize(params, quantize, modules=quant.DECODE, consume=True)


def step_bytes(params) -> int:
    """Bytes of the weights one decode step reads (everything but the embedding and adaptor)."""
    from kimia_jax.layers import quant

    return quant.nbytes(
        {k: v for k, v in params.items() if k not in ("embed_tokens", "vq_adaptor")}
    )


def paper(cfg) -> dict[str, float]:
    """GB of the LLM weights per storage: fp32, bf16, int8 (`quant.DECODE` int8 + one fp32 scale
    per row, the rest bf16), int4 (groups of 64 inputs with fp32 scales, the rest bf16)."""
    import jax
    import numpy as np
    from flax import traverse_util

    from kimia_jax.layers import quant
    from kimia_jax.models import kimia_llm

    flat = traverse_util.flatten_dict(
        jax.tree.map(lambda x: x.value, kimia_llm.abstract_params(cfg),
                     is_leaf=lambda x: hasattr(x, "value")), sep="/")  # fmt: skip
    n = sum(int(np.prod(v.shape)) for v in flat.values())
    qd = {k: v for k, v in flat.items() if quant.is_target(k, v, quant.DECODE)}
    nq = sum(int(np.prod(v.shape)) for v in qd.values())
    rows = sum(int(np.prod(v.shape[:-1])) for v in qd.values())
    rest = n - nq
    gb = 1e9
    return {
        "params_B": n / 1e9,
        "fp32": 4 * n / gb,
        "bf16": 2 * n / gb,
        "int8": (nq + 4 * rows + 2 * rest) / gb,
        "int4": (nq / 2 + 4 * nq / 64 + 2 * rest) / gb,
    }


def main(argv):
    del argv
    os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(_PLATFORM.value, _PLATFORM.value)
    import jax

    if jax.default_backend() != _PLATFORM.value:
        raise app.UsageError(f"--platform={_PLATFORM.value}, but jax runs on "
                             f"{jax.default_backend()} ({jax.devices()})")  # fmt: skip

    from tools.timing import best_of, jax_generate_runner

    if _PAPER.value:
        p = paper(_config("7b", "bfloat16"))
        print(f"Kimi-Audio-7B LLM ({p['params_B']:.2f} B params) weights: " + ", ".join(
            f"{k} {p[k]:.1f} GB" for k in ("fp32", "bf16", "int8", "int4")))  # fmt: skip
        return
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(f"prompt {_PROMPT.value}, {_STEPS.value} decode steps, output_type both, best of "
          f"{_REPEATS.value}")  # fmt: skip
    for size in _SIZES.value:
        for name in _VARIANTS.value:
            if name not in VARIANTS:
                raise app.UsageError(f"--variants: unknown {name!r} ({', '.join(VARIANTS)})")
            dtype, q = VARIANTS[name]
            cfg = _config(size, dtype)
            params = params_for(cfg, q)
            nbytes = step_bytes(params)
            for b in (int(x) for x in _BATCH.value):
                run = jax_generate_runner(cfg, b, _PROMPT.value, _STEPS.value, "both", params)
                run(1), run(_STEPS.value + 1)  # compile both
                t1 = best_of(lambda run=run: run(1), _REPEATS.value)
                tn = best_of(lambda run=run: run(_STEPS.value + 1), _REPEATS.value)
                sps = _STEPS.value / (tn - t1) if tn > t1 else float("nan")
                print(f"{size:>5} {name:>8} batch {b}: {sps:8.1f} steps/s "
                      f"({b * sps:8.1f} tokens/s), weights read/step {nbytes / 1e6:9.3f} MB, "
                      f"{nbytes * sps / 1e9:6.1f} GB/s", flush=True)  # fmt: skip
            del params, run  # the runner holds the params: free them before the next init


if __name__ == "__main__":
    app.run(main)

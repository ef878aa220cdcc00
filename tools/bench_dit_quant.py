"""The detokenizer DiT with int8 weights (`Detokenizer(quantize="int8")`) against float, in one
run: speed of one DiT evaluation (one of a chunk's 30 ODE steps) and its output error.

    python -m tools.bench_dit_quant --depth=2 --frames=168 --cached=128

Random weights (`FlowDiT.init`) at the released width (hidden 2304, 18 heads, MLP 9216, vocab
16385) with `--depth` blocks (each block has the released shapes; time scales with depth), one
row of `--frames` chunk frames attending over `--cached` committed frames. Variants: fp32, int8
weights with fp32 compute, bf16, int8 weights with bf16 compute. Each is jitted once, then timed
best of `--repeats`. Error: max |v - v_fp32| / max |v_fp32| of the velocity output.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

_DEPTH = flags.DEFINE_integer("depth", 2, "DiT blocks (released shapes each).")
_FRAMES = flags.DEFINE_integer("frames", 168, "Chunk frames (a 42-token chunk at 4 frames each).")
_CACHED = flags.DEFINE_integer("cached", 128, "Committed frames in the K/V cache.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best of).")
_HIDDEN = flags.DEFINE_integer("hidden", 2304, "Hidden size (released: 2304).")

# (compute dtype, DiT quantization)
VARIANTS = {
    "fp32": ("float32", None),
    "int8_f32": ("float32", "int8"),
    "bf16": ("bfloat16", None),
    "int8_bf16": ("bfloat16", "int8"),
}


def main(argv):
    del argv
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from kimia_jax.layers import quant
    from kimia_jax.layers.kv_cache import KVCache
    from kimia_jax.models.flow_dit import DiTConfig, FlowDiT, example_inputs

    d = _HIDDEN.value
    base = DiTConfig(input_size=80, semantic_vocab_size=16384, hidden_size=d, depth=_DEPTH.value,
                     num_heads=d // 128, mlp_ratio=4.0)  # fmt: skip
    params = jax.jit(lambda k: nn.unbox(FlowDiT(base).init(k, *example_inputs(base))["params"]))(
        jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    n, s = _FRAMES.value, _CACHED.value
    x = jnp.asarray(rng.standard_normal((1, n, 80)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 16384, (1, n)), jnp.int32)
    t = jnp.full((1,), 500, jnp.int32)
    pos = jnp.arange(s, s + n, dtype=jnp.int32)[None]
    frames = jnp.ones((1, n), bool)
    print(f"DiT hidden {d}, {base.depth} blocks, {n} frames over {s} cached; "
          f"{jax.devices()[0].platform}")  # fmt: skip
    ref = None
    for name, (dtype, q) in VARIANTS.items():
        cfg = dataclasses.replace(base, dtype=dtype)
        p = jax.tree.map(lambda a, dt=dtype: a.astype(dt), params)
        p = quant.quantize_dense(p, q, modules=quant.DIT)
        kv = jnp.asarray(rng.standard_normal((cfg.depth, 1, s, cfg.num_heads, cfg.head_dim)),
                         dtype)  # fmt: skip
        cache = KVCache(k=kv, v=kv, length=jnp.full((1,), s, jnp.int32))
        model = FlowDiT(cfg)
        fn = jax.jit(lambda p, c, m=model: m.apply({"params": p}, x, tokens, t, pos, c, frames)[0])
        out = jax.block_until_ready(fn(p, cache))
        best = float("inf")
        for _ in range(_REPEATS.value):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(p, cache))
            best = min(best, time.perf_counter() - t0)
        out = np.asarray(out, np.float32)
        ref = out if ref is None else ref
        err = np.abs(out - ref).max() / np.abs(ref).max()
        print(f"{name:10s} {best * 1e3:9.1f} ms / DiT evaluation   weights "
              f"{quant.nbytes(p) / 2**20:8.1f} MiB   max rel err vs fp32 {err:.2e}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)

"""`make demo`: the main job end to end on a tiny random checkpoint the repo makes itself.

    python -m experiments.demo --workdir demo_out

1. writes a tiny Kimi-Audio LLM in the released layout (bf16 safetensors shards + index),
2. converts it to an Orbax checkpoint (verified, atomic),
3. loads it and greedy-decodes a few tokens of both streams from a prompt, in one compiled call.
Tiny random weights produce random tokens; point `experiments.infer` at a real checkpoint for
real output (README). Takes ~30 s on 2 CPU cores, mostly compilation.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Where the tiny checkpoints and outputs go.")
_STEPS = flags.DEFINE_integer("steps", 12, "Tokens to decode.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kimia_jax.conversion import llm as conv
    from kimia_jax.inference import generate as gen
    from kimia_jax.models.kimia_llm import KimiaLLM
    from kimia_jax.testing import tiny_llm

    work = Path(_WORKDIR.value)
    hf_dir, orbax_dir = work / "tiny-Kimi-Audio-7B-Instruct", work / "tiny-kimia-orbax"
    for d in (hf_dir, orbax_dir):
        shutil.rmtree(d, ignore_errors=True)

    t0 = time.perf_counter()
    tiny_llm.write(hf_dir, dtype="bfloat16")
    print(f"[1/3] wrote tiny released-layout LLM to {hf_dir} ({time.perf_counter() - t0:.1f}s)")

    stats = conv.convert_to_orbax(hf_dir, orbax_dir, dtype="float32", progress=True)
    print(f"[2/3] converted {stats['tensors']} tensors -> {orbax_dir} ({stats['seconds']:.1f}s, "
          f"peak RSS {stats['peak_rss_mib']:.0f} MiB)")  # fmt: skip

    cfg, params = conv.load(orbax_dir)
    # A prompt shaped like the official ASR one (spec/llm.md §5.4): user marker, 5 text tokens,
    # media block with 8 audio codes, ct marker, msg_end, assistant marker.
    blank, user, asst, ct, msg_end = 623, 627, 628, 632, 605
    codes = list(range(cfg.kimia_token_offset, cfg.kimia_token_offset + 8))
    audio = [user] + [blank] * 5 + [cfg.kimia_media_begin] + codes + [cfg.kimia_media_end, ct, msg_end, asst]
    text = [blank] + [101, 202, 303, 404, 505] + [blank] * (len(audio) - 6)
    prompt = gen.Prompt(
        audio_ids=jnp.asarray([audio], jnp.int32),
        text_ids=jnp.asarray([text], jnp.int32),
        lengths=jnp.asarray([len(audio)], jnp.int32),
    )
    stream = gen.StreamConfig(output_type="both", text_blank=blank, text_eos=624,
                              eod_ids=(msg_end, cfg.kimia_media_end))  # fmt: skip
    gen.check_prompt(cfg, prompt, _STEPS.value, None)
    kw = dict(model=KimiaLLM(cfg), max_new_tokens=_STEPS.value, stream=stream)
    t0 = time.perf_counter()
    out = jax.block_until_ready(gen.generate_fixed(params, prompt, jax.random.key(0), **kw))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(gen.generate_fixed(params, prompt, jax.random.key(0), **kw))
    again = time.perf_counter() - t0
    text_tokens, audio_tokens = gen.returned_tokens(out, stream)
    print(f"[3/3] greedy dual-stream decode of {int(out.num_steps[0])} steps "
          f"(compile+run {first:.1f}s, run {again * 1e3:.1f} ms)")  # fmt: skip
    print(f"  text tokens : {np.asarray(text_tokens).tolist()}")
    print(f"  audio tokens: {np.asarray(audio_tokens).tolist()} (after the 6-step audio delay)")
    print("Tiny random weights give random tokens. For real output convert the released")
    print("Kimi-Audio-7B-Instruct folder (python -m tools.convert_llm) and see README.md.")


if __name__ == "__main__":
    app.run(main)

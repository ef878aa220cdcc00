"""Prefill and decode throughput of the JAX port vs a PyTorch reference, measured in one run.

    python -m tools.bench_llm                      # tiny + Qwen2.5-0.5B-shaped, batch 1
    python -m tools.bench_llm --sizes=tiny --batch=1,8

Reference: transformers `Qwen2ForCausalLM` of the same work per token (main + MIMO layers as
one stack, plus the second head applied to the last hidden state), fp32, its own KV cache, and
the official per-token Python loop (greedy argmax on both heads, text token fed back). Ours: the
compiled `generate` (prefill + whole decode loop in one jitted while_loop). Same thread count.
Decode tokens/s = steps / (time(prefill + N steps) - time(prefill + 0 steps)) for both.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from tools.timing import best_of, jax_generate_runner, torch_kimia_twin

_SIZES = flags.DEFINE_list("sizes", ["tiny", "0.5b"], "Model sizes: tiny, 0.5b.")
_BATCH = flags.DEFINE_list("batch", ["1"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt length (tokens).")
_STEPS = flags.DEFINE_integer("steps", 64, "Decode steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best of).")


def _rate(count: float, seconds: float) -> float:
    """count / seconds; NaN when timing noise exceeds the decode time (use more --steps)."""
    return count / seconds if seconds > 0 else float("nan")


def bench_jax(cfg, batch: int, prompt_len: int, steps: int, repeats: int) -> dict[str, float]:
    run = jax_generate_runner(cfg, batch, prompt_len, steps, "both")  # the torch side's work

    t0 = time.perf_counter()
    run(1)
    compile_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(steps + 1)
    compile_full = time.perf_counter() - t0
    t_prefill = best_of(lambda: run(1), repeats)
    t_full = best_of(lambda: run(steps + 1), repeats)
    return dict(
        prefill_tok_s=batch * prompt_len / t_prefill,
        decode_tok_s=_rate(batch * steps, t_full - t_prefill),
        compile_s=compile_prefill + compile_full,
    )


def bench_torch(cfg, batch: int, prompt_len: int, steps: int, repeats: int) -> dict[str, float]:
    import torch
    import transformers

    model, head2 = torch_kimia_twin(cfg)
    ids = torch.randint(0, cfg.kimia_token_offset, (batch, prompt_len))

    @torch.inference_mode()
    def run(n):
        out = model.model(
            input_ids=ids, past_key_values=transformers.DynamicCache(), use_cache=True
        )
        h = out.last_hidden_state[:, -1:]
        text, _ = model.lm_head(h), head2(h)
        past = out.past_key_values
        tok = text.argmax(-1)
        for i in range(n):
            pos = torch.full((batch, 1), prompt_len + i)
            out = model.model(input_ids=tok, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
            h = out.last_hidden_state
            text, audio = model.lm_head(h), head2(h)
            tok = text.argmax(-1)
            audio.argmax(-1)
        return tok

    run(1)
    t_prefill = best_of(lambda: run(0), repeats)
    t_full = best_of(lambda: run(steps), repeats)
    return dict(
        prefill_tok_s=batch * prompt_len / t_prefill,
        decode_tok_s=_rate(batch * steps, t_full - t_prefill),
    )


def main(argv):
    del argv
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    from kimia_jax.configs import PRESETS

    cfgs = {name: PRESETS[name]() for name in _SIZES.value}
    print(
        f"threads={threads}  prompt={_PROMPT.value}  steps={_STEPS.value}  fp32, "
        f"best of {_REPEATS.value}"
    )
    print(
        "| size | batch | ours prefill tok/s | torch prefill tok/s | prefill ratio | "
        "ours decode tok/s | torch decode tok/s | decode ratio | our compile s |"
    )
    print("|---" * 9 + "|")
    for size in _SIZES.value:
        for b in (int(x) for x in _BATCH.value):
            ours = bench_jax(cfgs[size], b, _PROMPT.value, _STEPS.value, _REPEATS.value)
            ref = bench_torch(cfgs[size], b, _PROMPT.value, _STEPS.value, _REPEATS.value)
            print(
                f"| {size} | {b} | {ours['prefill_tok_s']:.1f} | {ref['prefill_tok_s']:.1f} | "
                f"{ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x | "
                f"{ours['decode_tok_s']:.1f} | "
                f"{ref['decode_tok_s']:.1f} | {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x | "
                f"{ours['compile_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)

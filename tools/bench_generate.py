"""End-to-end generation speed vs a PyTorch reference loop, measured in one run.

    python -m tools.bench_generate                       # tiny + 0.5b shapes, batch 1 and 8
    python -m tools.bench_generate --sizes=tiny --ttfa   # + time to first audio chunk

Decode steps/s: our compiled dual-stream loop (`generate.generate`, output_type "both", greedy,
no stop token so every row runs the full budget) against the official per-token Python loop
(`KimiAudio._generate_loop` logic: forward, sample both heads via log_softmax/argmax, 6-token
audio delay, blank substitution, `.item()` stop checks) on a transformers Qwen2 with the same
work per token (main + MIMO layers, two heads), fp32, same thread count. The official loop is
B = 1 only, so its batch-8 figure is 8 requests one after another; ours runs 8 rows in one call.

On a GPU host (`--platform=gpu`): JAX on its CUDA backend, torch on `cuda`, same dtype on both
sides (`--dtype=bfloat16` is what a GPU user runs; fp32 there uses TF32-free fp32 matmuls in torch
and JAX's default precision).

    python -m tools.bench_generate --platform=gpu --dtype=bfloat16 --sizes=0.5b --batch=1,8

Time to first audio chunk (--ttfa, tiny checkpoint; excluding the audio tokenizer / whisper
prompt building, which the reference side does not run): prefill, the decode steps until the
detokenizer's first chunk is complete (37 when every audio sample is an audio id: 6 delayed +
30 codes + 1 look-ahead proof; the bench zeroes the tiny audio head's rows below the audio
offset so that greedy picks audio ids as a trained model does), then the first detokenizer chunk
(DiT ODE + vocoder). Ours: `KimiAudio.generate_stream` (warm); reference: the torch loop above
for the same number of steps + the PyTorch detokenizer reference
(`tools/detok_torch_reference.py`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
from absl import app, flags

from kimia_jax.text.conversation import AUDIO_DELAY
from tools.timing import best_of, jax_generate_runner, torch_kimia_twin

_SIZES = flags.DEFINE_list("sizes", ["tiny", "0.5b"], "Model sizes: tiny, 0.5b.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt length.")
_STEPS = flags.DEFINE_integer("steps", 64, "Decode steps per row.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (best of).")
_TTFA = flags.DEFINE_bool("ttfa", False, "Also measure time to first audio chunk (tiny).")
_PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "Where both sides run.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Params and compute dtype, both sides."
)
_MODES = flags.DEFINE_list(
    "output_types",
    ["both", "text"],
    'Our loop\'s output_type: "both" runs every layer and both heads each step, as the reference '
    'always does; "text" (ASR, QA, captioning) lets XLA drop the MIMO layers and audio head, '
    "whose samples that mode never uses.",
)


def ours_steps_per_s(cfg, batch, prompt_len, steps, repeats, output_type="both"):
    run = jax_generate_runner(cfg, batch, prompt_len, steps, output_type)
    run(1), run(steps + 1)  # compile both
    t1, tn = best_of(lambda: run(1), repeats), best_of(lambda: run(steps + 1), repeats)
    return batch * steps / (tn - t1) if tn > t1 else float("nan")  # noise > decode time


class TorchLoop:
    """The official per-token generation loop on a transformers Qwen2 of the same work."""

    def __init__(self, cfg, device: str = "cpu"):
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        dtype = getattr(torch, cfg.dtype)
        model, head2 = torch_kimia_twin(cfg, dtype=dtype)
        self.model, self.head2 = model.to(device, dtype), head2.to(device, dtype)
        self.cfg, self.device = cfg, device

    def run(self, prompt_len: int, steps: int, blank: int = 0) -> None:
        torch = self.torch
        emb = self.model.model.embed_tokens
        with torch.inference_mode():
            dev = self.device
            audio = torch.randint(0, self.cfg.kimia_token_offset, (1, prompt_len), device=dev)
            text = torch.randint(0, self.cfg.kimia_token_offset, (1, prompt_len), device=dev)
            past = self.transformers.DynamicCache()
            text_prev = torch.zeros(4096, dtype=torch.long)
            audio_prev = torch.zeros(4096, dtype=torch.long)
            pos = torch.arange(prompt_len, device=dev)[None]
            last = prompt_len - 1
            for i in range(steps):
                x = emb(audio) + emb(text)  # the two streams' embeddings are summed (spec §3.1)
                out = self.model.model(inputs_embeds=x, position_ids=pos, past_key_values=past,
                                       use_cache=True)  # fmt: skip
                past = out.past_key_values
                h = out.last_hidden_state[:, -1:]
                text_logits, audio_logits = self.model.lm_head(h), self.head2(h)
                nt = torch.log_softmax(text_logits[:, -1].float(), -1).argmax(-1)
                na = torch.log_softmax(audio_logits[:, -1].float(), -1).argmax(-1)
                if i < AUDIO_DELAY:
                    na = torch.full_like(na, blank)
                text_prev[i], audio_prev[i] = nt.item(), na.item()
                if na.item() in (-1, -2):  # the official eod check (never fires here)
                    break
                audio, text = na[:, None], nt[:, None]
                last += 1
                pos = torch.tensor([[last]], device=dev)


def ttfa(repeats: int) -> tuple[float, float]:
    """Time to first audio chunk, tiny checkpoint: (ours, reference) seconds."""
    import tempfile

    from kimia_jax.configs import LlmConfig
    from kimia_jax.inference.api import KimiAudio
    from kimia_jax.testing import tiny_kimia, tiny_llm
    from tools.detok_torch_reference import TorchDetokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = tiny_kimia.write(f"{tmp}/m", dtype="float32")
        model = KimiAudio(root, load_detokenizer=True, dtype="float32")
        # Like a trained model, emit audio ids every step: the random audio head mostly picks
        # ids below the audio offset, which the official filter drops, so the first chunk would
        # wait for hundreds of steps. Zero logits for those rows make greedy pick audio ids.
        head = model.params["mimo_output"]["weight"]
        model.params["mimo_output"]["weight"] = head.at[: model.kimia_token_offset].set(0.0)
        chat = [{"role": "user", "message_type": "audio",
                 "content": "experiments/assets/kimi_qa_example.wav"}]  # fmt: skip
        plen = len(model.prompt_builder.build(chat, "both"))

        def first_chunk():
            t0 = time.perf_counter()
            for piece in model.generate_stream(chat, output_type="both", chunk_steps=8):
                if piece["audio"] is not None:
                    return time.perf_counter() - t0, piece["steps"]
            return float("nan"), 0

        _, steps = first_chunk()  # compile
        ours = min(first_chunk()[0] for _ in range(repeats))
        # Our figure includes building the prompt from the audio file (GLM tokens + whisper
        # features); the reference's does not, so that part is subtracted for the comparison.
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.prompt_builder.build(chat, "both")
        prompt_s = (time.perf_counter() - t0) / repeats
        # The reference runs as many LLM steps as ours needed.
        print(
            f"ours: first audio chunk {ours:.3f}s after {steps} LLM steps, including "
            f"{prompt_s:.3f}s of prompt building"
        )
        ours -= prompt_s
        loop = TorchLoop(LlmConfig.from_json(tiny_llm.TINY_CONFIG))  # the folder's LLM shape
        ref_det = TorchDetokenizer.from_released(root)
        from kimia_jax.detokenizer import plan_chunks

        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 48, 60)  # two chunks: the first is not final, as when streaming
        noise, carry = [], 0
        for s, e, fin in plan_chunks(len(tokens)):
            noise.append(rng.standard_normal(((e - s) * 4 + carry, 80)).astype(np.float32))
            carry = 0 if fin else 12 * 4

        def reference():
            t0 = time.perf_counter()
            loop.run(plen, steps)
            first = []
            ref_det.detokenize_audio(
                tokens, noise, on_chunk=lambda i: first.append(time.perf_counter() - t0)
            )
            return first[0]

        reference()
        ref = min(reference() for _ in range(repeats))
    return ours, ref


def main(argv):
    del argv
    import jax
    import torch

    from kimia_jax.configs import PRESETS

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = "cuda" if _PLATFORM.value == "gpu" else "cpu"
    dt = _DTYPE.value
    cfgs = {n: dataclasses.replace(PRESETS[n](), dtype=dt, param_dtype=dt) for n in _SIZES.value}
    where = jax.devices()[0].device_kind if device == "cuda" else f"threads={threads}"
    print(
        f"{where} prompt={_PROMPT.value} steps={_STEPS.value} {dt} greedy, best of {_REPEATS.value}"
    )
    print(
        "| size | output_type | batch | ours steps/s (all rows) | reference steps/s (sequential) "
        "| ratio |"
    )
    print("|---|---|---|---|---|---|")
    for size in _SIZES.value:
        loop = TorchLoop(cfgs[size], device)
        loop.run(_PROMPT.value, 4)
        t_ref = best_of(lambda loop=loop: loop.run(_PROMPT.value, _STEPS.value), _REPEATS.value)
        t_pre = best_of(lambda loop=loop: loop.run(_PROMPT.value, 1), _REPEATS.value)
        ref_rate = (_STEPS.value - 1) / (t_ref - t_pre) if t_ref > t_pre else float("nan")
        for mode in _MODES.value:
            for b in (int(x) for x in _BATCH.value):
                ours = ours_steps_per_s(
                    cfgs[size], b, _PROMPT.value, _STEPS.value, _REPEATS.value, mode
                )
                print(
                    f"| {size} | {mode} | {b} | {ours:.1f} | {ref_rate:.1f} | "
                    f"{ours / ref_rate:.2f}x |",
                    flush=True,
                )
    if _TTFA.value:
        o, r = ttfa(_REPEATS.value)
        print(
            f"time to first audio chunk (tiny): ours {o:.3f}s, reference {r:.3f}s, "
            f"ratio {r / o:.2f}x"
        )


if __name__ == "__main__":
    if "--platform=gpu" not in sys.argv:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)

"""Train-step time and tokens/s of the JAX train step vs a PyTorch reference step, in one run.

    python -m tools.bench_train                     # tiny and Qwen2.5-0.5B shapes
    python -m tools.bench_train --sizes=0.5b --batch=1 --seq=512 --repeats=3

Same work on both sides, fp32 on the CPU, same thread count:
* ours: `training.train_step.TrainStep` (the real compiled step: dual-head KimiaLLM forward, the
  chunked two-stream loss, backward, global-norm clip, AdamW; donated state). The step always
  runs the (frozen) Whisper encoder on W >= 1 windows per row, which the reference does not have:
  here W = 1 and a 1-layer, 4-wide encoder (adaptor input 16), so ours additionally computes one
  30 s log-mel per row (a small extra cost on our side only).
* reference: `kimia_jax.testing.torch_kimia.TorchKimia` (transformers `Qwen2ForCausalLM`: the
  main stack, its final norm and text head; the Kimi MIMO branch from transformers' own
  `Qwen2DecoderLayer`s seeded by the output of main layer
  `kimia_mimo_transformer_from_layer_index`, `mimo_norm`, `mimo_output`; checked against the
  official fixture logits in tests/training/export_torch_test.py); loss =
  masked mean CE of each head, summed; `loss.backward()`, `clip_grad_norm_(1.0)`,
  `torch.optim.AdamW` (the official fine-tuning model, without DeepSpeed).
Achieved FLOP/s use the model FLOPs of one step, 3 x forward, forward = 2 x (every matmul weight,
both heads included) x tokens + 4 x layers x T x hidden x tokens (attention scores and values,
full T x T as computed), against the fp32 GEMM peak measured on these hosts (perf-notes.md).
Ours and torch alternate `--rounds` times, one side in memory at a time (the 0.5B shape holds
~13 GB of params, gradients and AdamW moments per side); each number is the best of `--repeats`
steps. Compiles are cached on disk between rounds (`--cache_dir`).
"""

from __future__ import annotations

import gc
import os
import subprocess
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark (libtpu, if installed, stays idle)

_SIZES = flags.DEFINE_list("sizes", ["tiny", "0.5b"], "Model sizes: tiny, 0.5b.")
_BATCH = flags.DEFINE_list("batch", ["8", "1"], "Rows per step, one per size.")
_SEQ = flags.DEFINE_list("seq", ["128", "512"], "Row length, one per size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per round (best of).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating ours/torch rounds.")
_CACHE = flags.DEFINE_string("cache_dir", "/tmp/kimia_bench_train_cache", "JAX compile cache.")
_PEAK = flags.DEFINE_float(
    "peak_gflops", None, "fp32 GEMM peak; default from lscpu (EPYC 180, Xeon AMX 302)."
)


def gemm_peak() -> tuple[float, str]:
    """(GFLOP/s, host) from perf-notes.md: JAX fp32 GEMM 4096^2 on the 2-core hosts."""
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        model = ""
    name = next((ln.split(":", 1)[1].strip() for ln in model.splitlines()
                 if ln.startswith("Model name")), "unknown")  # fmt: skip
    return (302.0 if "Xeon" in name else 180.0), name


def model_flops(cfg, batch: int, seq: int) -> float:
    """Model FLOPs of one train step (3 x forward; see the module docstring)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f  # q, o, k, v, gate, up, down
    layers = cfg.num_hidden_layers + cfg.kimia_mimo_layers
    tokens = batch * seq
    forward = 2 * (layers * per_layer + 2 * v * d) * tokens + 4 * layers * seq * d * tokens
    return 3.0 * forward


def _batch(cfg, batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.kimia_token_offset, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), bool)
    return dict(
        audio_ids=ids[:, :-1], text_ids=ids[:, :-1][:, ::-1].copy(),
        audio_labels=ids[:, 1:], text_labels=ids[:, 1:][:, ::-1].copy(),
        positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        segment_ids=ones.astype(np.int32), cont_src=np.full((batch, seq), -1, np.int32),
        is_continuous=~ones, audio_loss_mask=ones, text_loss_mask=ones,
        loss_weight=ones.astype(np.float32),
        whisper_wav=np.zeros((batch, 1, 480000), np.float32),
        whisper_keep=np.zeros((batch, 1), np.int32),
    )  # fmt: skip


class Ours:
    def __init__(self, cfg, batch: int, seq: int):
        import jax

        from kimia_jax.models import kimia_llm
        from kimia_jax.models import whisper_encoder as wenc
        from kimia_jax.training import train_step as ts
        from kimia_jax.training.optim import OptimConfig

        wcfg = wenc.WhisperConfig(d_model=4, encoder_attention_heads=1, encoder_ffn_dim=4,
                                  encoder_layers=1)  # fmt: skip
        tcfg = ts.TrainConfig(optim=OptimConfig(learning_rate=1e-5, weight_decay=0.1))
        self.step = ts.TrainStep(cfg, wcfg, tcfg)
        params = {"llm": kimia_llm.init_params(cfg, jax.random.key(0)),
                  "whisper": wenc.init_params(wcfg)}  # fmt: skip
        self.state = self.step.init(params, whisper_trainable=False)
        self.batch = jax.device_put(_batch(cfg, batch, seq))
        t0 = time.perf_counter()
        self()
        self.compile_s = time.perf_counter() - t0

    def __call__(self) -> float:
        import jax

        self.state, m = self.step(self.state, self.batch)
        return float(jax.block_until_ready(m["loss"]))


class Torch:
    def __init__(self, cfg, batch: int, seq: int):
        import dataclasses

        import torch

        from kimia_jax.testing.torch_kimia import TorchKimia

        torch.manual_seed(0)
        self.cfg = cfg
        self.model = TorchKimia(dataclasses.asdict(cfg)).train()
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
        b = _batch(cfg, batch, seq)
        self.b = {k: torch.as_tensor(v) for k, v in b.items() if "whisper" not in k}
        t0 = time.perf_counter()
        self()
        self.compile_s = time.perf_counter() - t0

    def __call__(self) -> float:
        import torch
        import torch.nn.functional as F

        b = self.b
        self.opt.zero_grad(set_to_none=True)
        text_logits, audio_logits = self.model(b["audio_ids"], b["text_ids"], b["positions"])

        def masked_mean(logits, labels, mask):
            ce = F.cross_entropy(logits.flatten(0, 1), labels.long().flatten(), reduction="none")
            mask = mask.flatten().float()
            return (ce * mask).sum() / (mask.sum() + 1e-4)

        loss = masked_mean(text_logits, b["text_labels"], b["text_loss_mask"]) + masked_mean(
            audio_logits, b["audio_labels"], b["audio_loss_mask"]
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return float(loss.detach())


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str]) -> None:
    del argv
    import jax
    import torch

    from kimia_jax import configs

    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    peak, host = (_PEAK.value, "given") if _PEAK.value else gemm_peak()
    print(f"host: {host}; {threads} threads; GEMM peak {peak:.0f} GFLOP/s fp32; "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    for size, b, t in zip(_SIZES.value, _BATCH.value, _SEQ.value, strict=True):
        batch, seq = int(b), int(t)
        cfg = configs.PRESETS[size](kimia_adaptor_input_dim=16)
        flops = model_flops(cfg, batch, seq)
        tok = batch * seq
        print(f"\n{size}: batch {batch} x {seq} tokens, {flops / 1e9:.1f} GFLOP/step")
        ratios = []
        for r in range(_ROUNDS.value):
            times, first = {}, {}
            for name, cls in (("ours", Ours), ("torch", Torch)):
                side = cls(cfg, batch, seq)
                first[name] = side.compile_s
                times[name] = _best(side, _REPEATS.value)
                del side
                gc.collect()
            t_ours, t_ref = times["ours"], times["torch"]
            ratios.append(t_ref / t_ours)
            print(
                f"  round {r}: ours {t_ours * 1e3:.0f} ms ({tok / t_ours:.0f} tok/s, "
                f"{flops / t_ours / 1e9:.1f} GFLOP/s = {100 * flops / t_ours / 1e9 / peak:.0f} % "
                f"of peak) | torch {t_ref * 1e3:.0f} ms ({tok / t_ref:.0f} tok/s, "
                f"{flops / t_ref / 1e9:.1f} GFLOP/s = {100 * flops / t_ref / 1e9 / peak:.0f} %) "
                f"| speed-up {t_ref / t_ours:.2f}x | first step ours {first['ours']:.1f} s, "
                f"torch {first['torch']:.1f} s | load {os.getloadavg()[0]:.1f}"
            )
        print(f"  speed-up over rounds: {', '.join(f'{x:.2f}x' for x in ratios)}")


if __name__ == "__main__":
    app.run(main)

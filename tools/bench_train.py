"""Train-step time and tokens/s of the JAX train step vs a PyTorch reference step, in one run.

    python -m tools.bench_train                     # tiny and Qwen2.5-0.5B shapes, CPU fp32
    python -m tools.bench_train --sizes=0.5b --batch=1 --seq=512 --repeats=3
    python -m tools.bench_train --platform=gpu --dtype=bfloat16 --sizes=0.5b --batch=8 --seq=1024

Same work on both sides, same precision (`--dtype`: float32, or bfloat16 compute with fp32 master
weights and fp32 AdamW on our side, `torch.autocast(bfloat16)` around the forward and loss on the
torch side), on the same device (`--platform`: cpu, same thread count; gpu: torch on `cuda`, JAX on
its GPU backend, true fp32 matmuls on both in float32 mode, no TF32):
* ours: `training.train_step.TrainStep` (the real compiled step: dual-head KimiaLLM forward, the
  chunked two-stream loss, backward, global-norm clip, AdamW; donated state) on text/audio-token
  rows without Whisper windows (W = 0: the step runs no encoder and no log-mel, like the
  reference, which has neither).
* reference: `tools.torch_kimia.TorchKimia` (transformers `Qwen2ForCausalLM`: the
  main stack, its final norm and text head; the Kimi MIMO branch from transformers' own
  `Qwen2DecoderLayer`s seeded by the output of main layer
  `kimia_mimo_transformer_from_layer_index`, `mimo_norm`, `mimo_output`; checked against the
  official fixture logits in tests/training/export_torch_test.py); loss =
  masked mean CE of each head, summed; `loss.backward()`, `clip_grad_norm_(1.0)`,
  `torch.optim.AdamW` (the official fine-tuning model, without DeepSpeed).
`--masks`: which loss masks the rows carry, each timed on both sides in the same run (one compile
on our side: the masks are data):
* dense: every position of both streams supervised (all-ones masks; equal work on both sides).
* asr: rows laid out as the official ASR SFT (`training.examples.SftExampleBuilder.understanding`
  on a synthetic conversation: text instruction, user audio codes, assistant transcript; the
  tokenizer of tests/fixtures/training): audio loss mask all zero, text loss on the transcript and
  its eos (`--asr_text_frac` of the positions). The continuous-feature flags are cleared (no
  Whisper, as in the reference). Our default loss path (`LossConfig.sparse`) then skips the MIMO
  branch and runs the heads only at supervised positions; the reference, like the official code,
  computes everything. `--dense_path` also times our step with `LossConfig(sparse=False)`.
Achieved FLOP/s use the model FLOPs of one step, 3 x forward, forward = 2 x (every matmul weight,
both heads included) x tokens + 4 x layers x T x hidden x tokens (attention scores and values,
full T x T as computed), as MFU against `--peak_gflops` (default: CPU the fp32 GEMM peak measured
on these hosts, perf-notes.md; GPU the measured H100/H200 dense peak, 790 TFLOP/s bf16 and
50 TFLOP/s fp32). The asr rows also print MFU on useful FLOPs: the same count with the MIMO
layers only when the batch has an audio target and each head only at its supervised positions.
The import chain never loads grain, ml_collections, tensorboardX, librosa or soundfile (absent from
the GPU image; tests/tools/bench_train_test.py blocks them).
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

_PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "Device of both sides.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay fp32)."
)
_SCAN = flags.DEFINE_bool("scan_layers", False, "Ours: LLM layer stacks as nn.scan.")
_REMAT = flags.DEFINE_string("remat_policy", "none", "Ours: LLM per-layer remat policy.")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "0.5b"], "Model sizes: tiny, 0.5b.")
_BATCH = flags.DEFINE_list("batch", ["8", "1"], "Rows per step, one per size.")
_SEQ = flags.DEFINE_list("seq", ["128", "512"], "Row length, one per size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per round (best of).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating ours/torch rounds.")
_MASKS = flags.DEFINE_list("masks", ["dense", "asr"], "Loss-mask layouts to time: dense, asr.")
_ASR_FRAC = flags.DEFINE_float(
    "asr_text_frac", 0.08, "asr rows: fraction of positions with text loss (transcript + eos)."
)
_DENSE_PATH = flags.DEFINE_bool(
    "dense_path", False, "Also time our step with LossConfig(sparse=False) (the dense CE)."
)
_CACHE = flags.DEFINE_string(
    "cache_dir", "/tmp/kimia_bench_train_cache", "JAX compile cache ('' for none)."
)
_PEAK = flags.DEFINE_float(
    "peak_gflops",
    None,
    "Peak GFLOP/s for MFU; default CPU: fp32 GEMM from lscpu (EPYC 180, Xeon AMX 302); "
    "GPU: H100/H200 measured dense peak, 790000 bf16, 50000 fp32.",
)
GPU_PEAK_GFLOPS = {"bfloat16": 790_000.0, "float32": 50_000.0}


def gemm_peak() -> tuple[float, str]:
    """(GFLOP/s, host) from perf-notes.md: JAX fp32 GEMM 4096^2 on the 2-core hosts."""
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        model = ""
    name = next((ln.split(":", 1)[1].strip() for ln in model.splitlines()
                 if ln.startswith("Model name")), "unknown")  # fmt: skip
    return (302.0 if "Xeon" in name else 180.0), name


def model_flops(cfg, batch: int, seq: int, *, mimo: bool = True, head_positions=None) -> float:
    """Model FLOPs of one train step (3 x forward; see the module docstring). `mimo`: count the
    MIMO layers; `head_positions`: (text, audio) positions each head is counted at (default: all
    batch x seq); with both defaults the work of the dense step, else the useful work."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f  # q, o, k, v, gate, up, down
    layers = cfg.num_hidden_layers + (cfg.kimia_mimo_layers if mimo else 0)
    tokens = batch * seq
    heads = 2 * tokens if head_positions is None else sum(head_positions)
    forward = 2 * layers * per_layer * tokens + 2 * v * d * heads
    forward += 4 * layers * seq * d * tokens
    return 3.0 * forward


def useful_flops(cfg, b: dict) -> float:
    """`model_flops` of the work a batch's loss masks use."""
    n_text, n_audio = int(b["text_loss_mask"].sum()), int(b["audio_loss_mask"].sum())
    batch, seq = b["text_loss_mask"].shape
    return model_flops(cfg, batch, seq, mimo=n_audio > 0, head_positions=(n_text, n_audio))


TOKENIZER_DIR = "tests/fixtures/training/tokenizer"  # the official fine-tuning fixtures'
TRANSCRIPT = (  # words of the asr rows' synthetic transcripts
    "he hoped there would be stew for dinner turnips and carrots and bruised potatoes and fat "
    "mutton pieces to be ladled out in thick peppered flour fattened sauce"
)


def _asr_batch(cfg, batch: int, seq: int, text_frac: float):
    """[batch, seq] rows of official ASR SFT examples (see the module docstring)."""
    import numpy as np

    from kimia_jax.text.tokenizer import TextTokenizer
    from kimia_jax.training import examples as ex_lib

    tok = TextTokenizer.from_pretrained(TOKENIZER_DIR)
    builder = ex_lib.SftExampleBuilder(
        tok, kimia_token_offset=cfg.kimia_token_offset, audio_loader=lambda x: x
    )
    rng = np.random.default_rng(0)
    words_ = TRANSCRIPT.split()
    n_codes = cfg.vocab_size - cfg.kimia_token_offset - 16

    def build(n_audio: int, n_words: int, seed: int):
        samples = 1280 * (n_audio - 1) + 17  # exactly n_audio Whisper rows (<= 375)
        text = " ".join(words_[(seed + i) % len(words_)] for i in range(n_words))
        return builder.understanding(
            "asr", np.zeros(samples, np.float32), text,
            instruction="Please transcribe the spoken content into written text.",
            codes=rng.integers(0, n_codes, n_audio),
        )  # fmt: skip

    target = max(1, round(text_frac * seq))
    exs = []
    for r in range(batch):
        words, n_audio = 1, 8
        while words < 400:  # transcript length: text targets (words' tokens + eos) ~ target
            if build(n_audio, words + 1, r).num_text_targets > target:
                break
            words += 1
        for _ in range(4):  # audio length: the row fills seq
            n_audio = min(375, max(1, n_audio + seq - len(build(n_audio, words, r))))
        exs.append(build(n_audio, words, r))
    b = ex_lib.batch_of(exs, seq, 1, tok.extra_tokens.pad, packed=False)
    b.update(
        is_continuous=np.zeros_like(b["is_continuous"]),
        cont_src=np.full_like(b["cont_src"], -1),
        whisper_wav=np.zeros((batch, 0, 480000), np.float32),
        whisper_keep=np.zeros((batch, 0), np.int32),
    )
    return b


def batches(cfg, batch: int, seq: int, masks, text_frac: float) -> dict:
    """{mask layout: numpy batch}."""
    make = {"dense": lambda: _batch(cfg, batch, seq),
            "asr": lambda: _asr_batch(cfg, batch, seq, text_frac)}  # fmt: skip
    unknown = set(masks) - set(make)
    if unknown:
        raise ValueError(f"--masks: unknown layouts {sorted(unknown)}; use dense, asr")
    return {m: make[m]() for m in masks}


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
        whisper_wav=np.zeros((batch, 0, 480000), np.float32),
        whisper_keep=np.zeros((batch, 0), np.int32),
    )  # fmt: skip


def peak(platform: str, dtype: str, given: float | None) -> tuple[float, str]:
    """(peak GFLOP/s, where it comes from)."""
    if given:
        return given, "given"
    if platform == "gpu":
        return GPU_PEAK_GFLOPS[dtype], f"H100/H200 measured dense {dtype} peak"
    gflops, host = gemm_peak()
    return gflops, f"{host} fp32 GEMM"


def rate(flops: float, tokens: int, seconds: float, peak_gflops: float) -> str:
    """tokens/s, achieved GFLOP/s and MFU (model FLOPs / peak) of one step."""
    gf = flops / seconds / 1e9
    return f"{tokens / seconds:.0f} tok/s, {gf:.1f} GFLOP/s, MFU {100 * gf / peak_gflops:.1f} %"


class Ours:
    """Our compiled step on each batch of `batches` (one compile: same shapes)."""

    def __init__(self, cfg, batches: dict, opts: dict, *, sparse: bool = True):
        import jax

        from kimia_jax.models import kimia_llm
        from kimia_jax.models import whisper_encoder as wenc
        from kimia_jax.training import train_step as ts
        from kimia_jax.training.loss import LossConfig
        from kimia_jax.training.optim import OptimConfig

        wcfg = wenc.WhisperConfig(d_model=4, encoder_attention_heads=1, encoder_ffn_dim=4,
                                  encoder_layers=1)  # fmt: skip
        tcfg = ts.TrainConfig(
            optim=OptimConfig(learning_rate=1e-5, weight_decay=0.1),
            loss=LossConfig(sparse=sparse),
            compute_dtype=opts["dtype"],
            scan_layers=opts["scan_layers"],
            remat_policy=opts["remat_policy"],
        )
        self.step = ts.TrainStep(cfg, wcfg, tcfg)
        params = {"llm": kimia_llm.init_params(cfg, jax.random.key(0)),
                  "whisper": wenc.init_params(wcfg)}  # fmt: skip
        self.state = self.step.init(params, whisper_trainable=False)
        self.batches = {k: jax.device_put(v) for k, v in batches.items()}
        t0 = time.perf_counter()
        self(next(iter(batches)))
        self.compile_s = time.perf_counter() - t0

    def __call__(self, kind: str) -> float:
        import jax

        self.state, m = self.step(self.state, self.batches[kind])
        return float(jax.block_until_ready(m["loss"]))


class Torch:
    """`tools.torch_kimia.TorchKimia` (transformers 4.46 and 5.x) + masked CE, AdamW."""

    def __init__(self, cfg, batches: dict, opts: dict):
        import dataclasses

        import torch

        from tools.torch_kimia import TorchKimia

        self.device = torch.device("cuda" if opts["platform"] == "gpu" else "cpu")
        self.autocast = opts["dtype"] == "bfloat16"
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = TorchKimia(dataclasses.asdict(cfg)).train().to(self.device)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
        self.batches = {
            kind: {
                k: torch.as_tensor(v).to(self.device) for k, v in b.items() if "whisper" not in k
            }
            for kind, b in batches.items()
        }
        t0 = time.perf_counter()
        self(next(iter(batches)))
        self.compile_s = time.perf_counter() - t0

    def __call__(self, kind: str) -> float:
        import torch

        b = self.batches[kind]
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self._loss(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    def _loss(self, b):
        import torch.nn.functional as F

        text_logits, audio_logits = self.model(b["audio_ids"], b["text_ids"], b["positions"])

        def masked_mean(logits, labels, mask):
            ce = F.cross_entropy(logits.flatten(0, 1), labels.long().flatten(), reduction="none")
            mask = mask.flatten().float()
            return (ce * mask).sum() / (mask.sum() + 1e-4)

        return masked_mean(text_logits, b["text_labels"], b["text_loss_mask"]) + masked_mean(
            audio_logits, b["audio_labels"], b["audio_loss_mask"]
        )


def _best(fn, kind: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(kind)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str]) -> None:
    del argv
    platform, dtype = _PLATFORM.value, _DTYPE.value
    # before jax is imported (libtpu, if installed, stays idle)
    os.environ["JAX_PLATFORMS"] = "cuda" if platform == "gpu" else "cpu"
    if platform == "gpu":  # JAX and torch share the GPU: no 75 % preallocation by JAX
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch

    from kimia_jax import configs

    if platform == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("--platform=gpu: torch sees no CUDA device")
        if dtype == "float32":  # true fp32 on both sides (no TF32)
            jax.config.update("jax_default_matmul_precision", "highest")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        host = f"{jax.devices()[0].device_kind} / {torch.cuda.get_device_name()}"
    else:
        host = "cpu"
    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    peak_gflops, peak_src = peak(platform, dtype, _PEAK.value)
    opts = dict(platform=platform, dtype=dtype, scan_layers=_SCAN.value,
                remat_policy=_REMAT.value)  # fmt: skip
    print(f"{platform} ({host}); {dtype}; jax {jax.__version__} torch {torch.__version__}; "
          f"{threads} threads; peak {peak_gflops:.0f} GFLOP/s ({peak_src}); "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    masks = _MASKS.value
    sides = [("ours", Ours, {}), ("torch", Torch, {})]
    if _DENSE_PATH.value:
        sides.insert(1, ("ours dense CE", Ours, {"sparse": False}))
    for size, b, t in zip(_SIZES.value, _BATCH.value, _SEQ.value, strict=True):
        batch, seq = int(b), int(t)
        cfg = configs.PRESETS[size](kimia_adaptor_input_dim=16)
        flops = model_flops(cfg, batch, seq)
        tok = batch * seq
        rows = batches(cfg, batch, seq, masks, _ASR_FRAC.value)
        print(f"\n{size}: batch {batch} x {seq} tokens, {flops / 1e9:.1f} GFLOP/step (dense)")
        for kind, rb in rows.items():
            nt, na = int(rb["text_loss_mask"].sum()), int(rb["audio_loss_mask"].sum())
            print(f"  {kind} rows: text loss at {100 * nt / tok:.1f} % of positions, audio loss "
                  f"at {100 * na / tok:.1f} %; useful work {useful_flops(cfg, rb) / 1e9:.1f} "
                  "GFLOP/step")  # fmt: skip
        ratios: dict[str, list[float]] = {k: [] for k in masks}
        for r in range(_ROUNDS.value):
            times, first = {}, {}
            for name, cls, kw in sides:
                side = cls(cfg, rows, opts, **kw)
                first[name] = side.compile_s
                for kind in masks:
                    times[name, kind] = _best(side, kind, _REPEATS.value)
                del side
                gc.collect()
                if platform == "gpu":
                    torch.cuda.empty_cache()
            for kind in masks:
                useful = useful_flops(cfg, rows[kind])
                t_ours, t_ref = times["ours", kind], times["torch", kind]
                ratios[kind].append(t_ref / t_ours)
                line = (
                    f"  round {r} {kind}: ours {t_ours * 1e3:.1f} ms "
                    f"({rate(useful, tok, t_ours, peak_gflops)}) | torch {t_ref * 1e3:.1f} ms "
                    f"({rate(useful, tok, t_ref, peak_gflops)}) | speed-up {t_ref / t_ours:.2f}x"
                )
                if ("ours dense CE", kind) in times:
                    t_d = times["ours dense CE", kind]
                    line += f" | ours dense CE {t_d * 1e3:.1f} ms ({t_d / t_ours:.2f}x)"
                print(line + f" | load {os.getloadavg()[0]:.1f}")
            print("  first step: " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()))
        for kind in masks:
            print(f"  {kind} speed-up over rounds: {', '.join(f'{x:.2f}x' for x in ratios[kind])}")
        print("  (GFLOP/s and MFU count the useful work: model FLOPs with the MIMO layers only "
              "when an audio target exists and each head at its supervised positions)")  # fmt: skip


if __name__ == "__main__":
    app.run(main)

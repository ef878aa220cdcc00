"""Detokenizer speed vs the PyTorch reference (same shapes, same run): RTF and first chunk.

    python -m tools.bench_detokenizer --preset=tiny --tokens=150
    python -m tools.bench_detokenizer --preset=released --tokens=60 --dit_depth=4  # random weights

`tiny` is the fixture checkpoint (loaded through the released-folder path); `released` builds the
real shapes (DiT 2304 x 16 blocks, vocab 16385; BigVGAN 2048 ch, rates 5,2,2,2,2,3,2, kernels
3,5,7,11) with random weights, about 15 GB of host RAM for both frameworks in float32.
Each framework runs the official chunk loop (first 30 tokens, then 30, look-ahead 12) with the
same noise. RTF = wall time / audio duration (lower is better); "speedup" = torch time / JAX time.
JAX is timed warm (after one run that compiles); its cold first-chunk time (compile) is printed too.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "released", "both"], "model size")
_TOKENS = flags.DEFINE_integer("tokens", 150, "semantic tokens (12.5 Hz) per utterance")
_ODE = flags.DEFINE_integer(
    "ode_steps", 30, "linspace points of the ODE (30 = official, 29 Euler steps)"
)
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed runs per framework (best is reported)")
_THREADS = flags.DEFINE_list(
    "torch_threads",
    ["1", "2"],
    "torch.set_num_threads values to try; the fastest is reported (with 2 "
    "threads on a busy 2-core machine torch's OpenMP sync can cost ms per op)",
)
_DEPTH = flags.DEFINE_integer(
    "dit_depth",
    16,
    "DiT blocks at --preset=released (every block has the released shapes; fewer "
    "blocks scale DiT time linearly and fit both frameworks in less host RAM: 16 needs ~16 GB)",
)
_FIXTURE = flags.DEFINE_string(
    "fixture",
    "tests/fixtures/detokenizer/Kimi-Audio-7B-Instruct",
    "tiny released-layout checkpoint",
)

RELEASED_DIT = {
    "input_size": 80,
    "semantic_vocab_size": 16384,
    "hidden_size": 2304,
    "depth": 16,
    "num_heads": 18,
    "mlp_ratio": 4.0,
    "ffn_type": "vanilla_mlp",
    "use_rope": True,
    "rope_params": {
        "max_position_embeddings": 4096,
        "rope_base": 10000.0,
        "rope_interpolation_factor": 1.0,
    },
    "position_embedding_type": "skip",
    "max_seq_len": 4096,
}
RELEASED_VOCODER = {
    "resblock": "1",
    "upsample_rates": [5, 2, 2, 2, 2, 3, 2],
    "upsample_kernel_sizes": [9, 4, 4, 4, 4, 5, 4],
    "upsample_initial_channel": 2048,
    "resblock_kernel_sizes": [3, 5, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5]] * 4,
    "activation": "snakebeta",
    "snake_logscale": True,
    "use_tanh_at_final": False,
    "use_bias_at_final": False,
    "num_mels": 80,
    "sampling_rate": 24000,
    "hop_size": 480,
}


def build_tiny(ode_steps: int):
    from kimia_jax.detokenizer import Detokenizer, StreamingConfig
    from tools.detok_torch_reference import TorchDetokenizer

    det = Detokenizer.from_pretrained(
        _FIXTURE.value, streaming=StreamingConfig(ode_steps=ode_steps)
    )
    ref = TorchDetokenizer.from_released(_FIXTURE.value, ode_steps=ode_steps)
    return det, ref


def build_released(ode_steps: int):
    import torch

    from kimia_jax.conversion.common import DictSource
    from kimia_jax.conversion.detokenizer import convert_dit, convert_vocoder
    from kimia_jax.detokenizer import Detokenizer, MelNorm, StreamingConfig
    from kimia_jax.models.bigvgan import BigVGANConfig
    from kimia_jax.models.flow_dit import DiTConfig
    from tools.detok_torch_reference import DiTPrefix, TorchDetokenizer, import_bigvgan

    torch.manual_seed(0)
    print("building the released-size torch models (random weights) ...", flush=True)
    dit_cfg = {**RELEASED_DIT, "depth": _DEPTH.value}
    dit = DiTPrefix(dit_cfg).eval()
    bigvgan = import_bigvgan()
    voc = bigvgan.BigVGAN(bigvgan.env.AttrDict(RELEASED_VOCODER), use_cuda_kernel=False).eval()
    n_dit = sum(p.numel() for p in dit.parameters())
    n_voc = sum(p.numel() for p in voc.parameters())
    print(f"DiT {n_dit / 1e9:.3f} B params, vocoder {n_voc / 1e6:.1f} M params", flush=True)
    dcfg = DiTConfig.from_dict(dit_cfg)
    vcfg = BigVGANConfig.from_dict(RELEASED_VOCODER)
    dsd = {k: v.detach().numpy() for k, v in dit.state_dict().items()}
    vsd = {k: v.detach().numpy() for k, v in voc.state_dict().items()}
    params = {
        "dit": convert_dit(DictSource(dsd), dcfg, progress=True),
        "vocoder": convert_vocoder(DictSource(vsd), vcfg, progress=True),
    }
    del dsd, vsd
    norm = MelNorm(True, -4.479605, 3.4584913)
    det = Detokenizer(dcfg, vcfg, params, norm, streaming=StreamingConfig(ode_steps=ode_steps))
    ref = TorchDetokenizer(dit, voc, norm.mel_mean, norm.mel_std, ode_steps=ode_steps)
    return det, ref


def time_jax(det, tokens, noise):
    t0 = time.perf_counter()
    first = None
    pieces = []
    for piece in det.stream(iter(tokens), noise=noise):
        pieces.append(piece)
        if first is None:
            first = time.perf_counter() - t0
    return time.perf_counter() - t0, first, np.concatenate(pieces)


def time_torch(ref, tokens, noise):
    t0 = time.perf_counter()
    first = []
    wav = ref.detokenize_audio(
        tokens, noise, on_chunk=lambda i: first.append(time.perf_counter() - t0) if i == 0 else None
    )
    return time.perf_counter() - t0, first[0], wav


def bench(preset: str) -> dict:
    import torch

    from kimia_jax.detokenizer import plan_chunks

    det, ref = (build_tiny if preset == "tiny" else build_released)(_ODE.value)
    rng = np.random.default_rng(0)
    n = _TOKENS.value
    tokens = rng.integers(0, det.dit_cfg.semantic_vocab_size, n)
    la = det.streaming.look_ahead_frames
    noise, carry = [], 0
    for _, (s, e, fin) in enumerate(plan_chunks(n)):
        length = carry + 4 * (e - s)
        noise.append(rng.standard_normal((length, 80)).astype(np.float32))
        carry = 0 if fin else la
    audio_s = n * 1920 / 24000

    from tqdm import tqdm

    threads = [int(t) for t in _THREADS.value]
    bar = tqdm(total=1 + (1 + len(threads)) * _REPEATS.value, desc=f"{preset}: runs")
    cold_total, cold_first, _ = time_jax(det, tokens, noise)
    bar.update(1)
    jt, tt = [], []
    for _ in range(_REPEATS.value):
        jt.append(time_jax(det, tokens, noise))
        bar.update(1)
        for th in threads:
            torch.set_num_threads(th)
            tt.append((*time_torch(ref, tokens, noise), th))
            bar.update(1)
    bar.close()
    j_total, j_first, j_wav = min(jt, key=lambda r: r[0])
    t_total, t_first, t_wav, t_threads = min(tt, key=lambda r: r[0])
    torch.set_num_threads(t_threads)
    err = float(np.abs(j_wav - t_wav).max())
    # Vocoder alone on one streamed chunk's input length (36 + 120 frames).
    mel = rng.normal(-5, 2, (156, 80)).astype(np.float32)
    det.vocode(mel)
    t0 = time.perf_counter()
    det.vocode(mel)
    jv = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        ref.vocoder(torch.from_numpy(mel.T[None]))
        tv = time.perf_counter() - t0
    return dict(
        preset=preset,
        audio_s=audio_s,
        torch_threads=t_threads,
        chunks=len(noise),
        ode_steps=_ODE.value,
        torch_s=t_total,
        jax_s=j_total,
        rtf_torch=t_total / audio_s,
        rtf_jax=j_total / audio_s,
        speedup=t_total / j_total,
        first_torch=t_first,
        first_jax=j_first,
        first_jax_cold=cold_first,
        jax_cold_total=cold_total,
        voc_torch=tv,
        voc_jax=jv,
        max_abs_diff=err,
    )


def main(argv):
    del argv
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; fp32, highest matmul precision")
    jax.config.update("jax_default_matmul_precision", "highest")
    presets = ["tiny", "released"] if _PRESET.value == "both" else [_PRESET.value]
    rows = [bench(p) for p in presets]
    print()
    print(
        "| preset | audio | Euler steps | torch RTF (threads) | JAX RTF | speedup "
        "| first chunk torch | first chunk JAX (warm / cold) | vocoder 156 fr torch / JAX "
        "| max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['audio_s']:.2f} s ({r['chunks']} chunks) | {r['ode_steps'] - 1} "
            f"| {r['rtf_torch']:.3f} ({r['torch_threads']}) | {r['rtf_jax']:.3f} "
            f"| {r['speedup']:.2f}x | {r['first_torch']:.2f} s "
            f"| {r['first_jax']:.2f} s / {r['first_jax_cold']:.2f} s "
            f"| {r['voc_torch']:.2f} s / {r['voc_jax']:.2f} s | {r['max_abs_diff']:.1e} |"
        )


if __name__ == "__main__":
    app.run(main)

"""Audio front-end throughput: kimia_jax vs the PyTorch reference, in one run.

    python -m tools.bench_tokenizer --size=tiny,medium [--repeats=3]

Measures seconds of audio processed per wall-clock second (end to end from in-memory 16 kHz
waveforms to token ids / continuous features, host-side feature extraction included), for
  * GLM-4-Voice tokens: ours (`GlmTokenizer`) vs transformers `WhisperFeatureExtractor` (padding
    "longest", pad_to_multiple_of=1280, as `extract_speech_token`) + a torch WhisperVQ encoder built
    from transformers `WhisperEncoderLayer`s (causal convs, block-causal mask, avg pool, addmm VQ);
  * whisper continuous features: ours (`WhisperFeatureExtractor`) vs the same feature extractor on
    30 s windows + transformers `WhisperEncoder`.
Each side runs once untimed (compile / warm-up, and the agreement check), then the best of
--repeats timed runs is kept. Both sides get the same random weights (the torch model is saved
in the released layout and loaded through our converter) and token agreement is printed.
Batch 1: one 10 s clip; batch 8: eight clips of 2-20 s (the reference gets all 8 in one call,
as `extract_speech_token` batches a list).
Sizes: tiny = the test fixtures' shapes; medium = whisper-small shape (d 768, 12 layers; GLM 8
layers); large = whisper-large-v3 (d 1280, 32 layers) and the released GLM tokenizer (16 layers,
16384 codes). Expect minutes per size beyond tiny on 2 CPU cores.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

from tools.timing import best_of

_SIZE = flags.DEFINE_list("size", ["tiny", "medium"], "tiny, medium, large")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per measurement (best is kept)")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "batch sizes to measure")
_PATHS = flags.DEFINE_list("paths", ["glm", "whisper"], "glm, whisper")

SHAPES = {  # d_model, heads, ffn, whisper layers, glm layers (pool = quantize position), codebook
    "tiny": (40, 5, 80, 2, 3, 48),
    "medium": (768, 12, 3072, 12, 8, 16384),
    "large": (1280, 20, 5120, 32, 16, 16384),
}


def _glm_config(d, h, f, n, v, pool):
    return {
        "model_type": "whisper",
        "architectures": ["WhisperVQEncoder"],
        "d_model": d,
        "encoder_attention_heads": h,
        "encoder_ffn_dim": f,
        "encoder_layers": n,
        "num_mel_bins": 128,
        "max_source_positions": 1500,
        "activation_function": "gelu",
        "encoder_causal_convolution": True,
        "encoder_causal_attention": False,
        "quantize_causal_encoder": False,
        "quantize_causal_block_size": 200,
        "pooling_kernel_size": 4,
        "pooling_type": "avg",
        "pooling_position": pool,
        "quantize_position": n,
        "quantize_vocab_size": v,
        "quantize_encoder_only": True,
        "scale_embedding": False,
    }


def _torch_glm(cfg: dict):
    """A torch WhisperVQ encoder (reference semantics, spec 4.3) from transformers layers."""
    import torch
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

    F = torch.nn.functional
    wc = transformers.WhisperConfig(
        d_model=cfg["d_model"],
        encoder_attention_heads=cfg["encoder_attention_heads"],
        encoder_ffn_dim=cfg["encoder_ffn_dim"],
        encoder_layers=cfg["quantize_position"],
    )
    wc._attn_implementation = "sdpa"

    def block_mask(valid, block):
        t = valid.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        allowed = ((j <= i) | (i // block == j // block))[None] & valid[:, None, :].bool()
        return ((~allowed).float() * torch.finfo(torch.float32).min)[:, None]

    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["d_model"]
            self.conv1 = torch.nn.Conv1d(128, d, 3)
            self.conv2 = torch.nn.Conv1d(d, d, 3, stride=2)
            self.embed_positions = torch.nn.Embedding(1500, d)
            self.layers = torch.nn.ModuleList(
                WhisperEncoderLayer(wc) for _ in range(cfg["quantize_position"])
            )
            self.codebook = torch.nn.Embedding(cfg["quantize_vocab_size"], d)
            self.embed_positions2 = torch.nn.Embedding(375, d)

        def forward(self, feats, mask):
            x = F.gelu(self.conv1(F.pad(feats, (2, 0))))
            x = F.gelu(self.conv2(F.pad(x, (2, 0)))).permute(0, 2, 1)
            x = x + self.embed_positions.weight[: x.shape[1]]
            valid = mask[:, ::2]
            ext = block_mask(valid, 200)
            for i, layer in enumerate(self.layers):
                x = layer(x, ext, layer_head_mask=None)[0]
                if i + 1 == cfg["pooling_position"]:
                    x = F.avg_pool1d(x.permute(0, 2, 1), 4).permute(0, 2, 1)
                    valid = valid[:, ::4]
                    ext = block_mask(valid, 50)
            flat = x.reshape(-1, x.shape[-1])
            cb = self.codebook.weight
            dist = torch.addmm(
                (cb**2).sum(1) + (flat**2).sum(1, keepdim=True), flat, cb.t(), alpha=-2.0
            )
            return dist.argmin(1).reshape(x.shape[0], -1), valid

    torch.manual_seed(0)
    ref = Ref().eval()
    with torch.no_grad():  # real-looking scales; codebook from the embedding scale
        for p in ref.parameters():
            p.normal_(0, 1 / np.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1)
        for m in ref.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
    return ref


def _clips(batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    secs = [10.0] if batch == 1 else [2, 4, 6, 8, 10, 12, 15, 20][:batch]
    # speech-like noise bursts (content does not matter for speed)
    out = []
    for s in secs:
        n = int(16000 * s)
        env = np.repeat(rng.uniform(0, 1, n // 1600 + 1), 1600)[:n]
        out.append((0.1 * env * rng.standard_normal(n)).astype(np.float32))
    return out


def bench_glm(size: str, batches: list[int], repeats: int, work: Path) -> list[str]:
    import torch
    import transformers
    from safetensors.torch import save_file

    from kimia_jax.audio import GlmTokenizer
    from kimia_jax.audio.io import split_segments

    d, h, f, _, n, v = SHAPES[size]
    cfg = _glm_config(d, h, f, n, v, pool=1 if size == "tiny" else n)
    ref = _torch_glm(cfg)
    folder = work / f"glm_{size}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: t.contiguous() for k, t in ref.state_dict().items()}, folder / "model.safetensors"
    )
    ours = GlmTokenizer.from_pretrained(folder)
    fe = transformers.WhisperFeatureExtractor(feature_size=128)

    def reference(clips):
        segs, owner = [], []
        for c, w in enumerate(clips):
            for s in split_segments(w):
                segs.append(s)
                owner.append(c)
        out = [[] for _ in clips]
        with torch.no_grad():
            for start in range(0, len(segs), 128):
                feats = fe(
                    segs[start : start + 128],
                    sampling_rate=16000,
                    return_attention_mask=True,
                    return_tensors="pt",
                    padding="longest",
                    pad_to_multiple_of=1280,
                )
                ids, valid = ref(feats.input_features, feats.attention_mask)
                for i in range(ids.shape[0]):
                    out[owner[start + i]].extend(ids[i][valid[i].bool()].tolist())
        return [np.asarray(o) for o in out]

    rows = []
    for b in batches:
        clips = _clips(b)
        audio_s = sum(len(c) for c in clips) / 16000
        got, want = ours.tokenize(clips), reference(clips)
        agree = np.mean(np.concatenate(got) == np.concatenate(want))
        t_ours = best_of(lambda clips=clips: ours.tokenize(clips), repeats)
        t_ref = best_of(lambda clips=clips: reference(clips), repeats)
        rows.append(
            f"| glm tokens | {size} | {b} | {audio_s:.0f} | {audio_s / t_ref:.1f} | "
            f"{audio_s / t_ours:.1f} | {t_ref / t_ours:.2f}x | {agree:.4f} |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_whisper(size: str, batches: list[int], repeats: int, work: Path) -> list[str]:
    import torch
    import transformers

    from kimia_jax.audio import WhisperFeatureExtractor
    from kimia_jax.audio.io import split_segments, token_len

    d, h, f, n, _, _ = SHAPES[size]
    if size == "tiny":
        d, h, f = 24, 3, 72
    wc = transformers.WhisperConfig(
        d_model=d,
        encoder_attention_heads=h,
        encoder_ffn_dim=f,
        encoder_layers=n,
        decoder_layers=1,
        decoder_attention_heads=h,
        decoder_ffn_dim=f,
        num_mel_bins=128,
        vocab_size=64,
        max_target_positions=32,
        pad_token_id=63,
        bos_token_id=62,
        eos_token_id=62,
        decoder_start_token_id=61,
        begin_suppress_tokens=None,
    )
    wc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.WhisperModel(wc).eval()
    folder = work / f"whisper_{size}"
    model.save_pretrained(folder, safe_serialization=True)
    encoder = model.encoder
    del model.decoder
    ours = WhisperFeatureExtractor.from_pretrained(folder)
    fe = transformers.WhisperFeatureExtractor(feature_size=128)

    def reference(clips):
        out = []
        with torch.no_grad():
            segs = [(c, s) for c, w in enumerate(clips) for s in split_segments(w)]
            feats = fe(
                [s for _, s in segs], sampling_rate=16000, return_tensors="pt", padding="max_length"
            )
            hs = encoder(feats.input_features).last_hidden_state.numpy()
            per = [[] for _ in clips]
            for (c, s), hh in zip(segs, hs, strict=True):
                per[c].append(hh[: 4 * token_len(len(s))])
            out = [np.concatenate(p).reshape(-1, 4 * d) for p in per]
        return out

    rows = []
    for b in batches:
        clips = _clips(b)
        audio_s = sum(len(c) for c in clips) / 16000
        got, want = ours.features(clips), reference(clips)
        err = max(
            float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want, strict=True)
        )
        t_ours = best_of(lambda clips=clips: ours.features(clips), repeats)
        t_ref = best_of(lambda clips=clips: reference(clips), repeats)
        rows.append(
            f"| whisper features | {size} | {b} | {audio_s:.0f} | {audio_s / t_ref:.1f} | "
            f"{audio_s / t_ours:.1f} | {t_ref / t_ours:.2f}x | rel err {err:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str]) -> None:
    del argv
    import jax
    import torch

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), fp32"
    )
    header = (
        "| path | size | batch | audio s | torch audio-s/s | ours audio-s/s | speed-up "
        "| agreement |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    print(header, flush=True)
    rows = []
    batches = [int(b) for b in _BATCHES.value]
    with tempfile.TemporaryDirectory() as tmp:
        for size in _SIZE.value:
            if "glm" in _PATHS.value:
                rows += bench_glm(size, batches, _REPEATS.value, Path(tmp))
            if "whisper" in _PATHS.value:
                rows += bench_whisper(size, batches, _REPEATS.value, Path(tmp))
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    app.run(main)

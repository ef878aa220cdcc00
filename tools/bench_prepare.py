"""Data-preparation throughput: ours (`data.extract_codes`, `data.prepare` on the DirectRunner)
vs the official `extract_semantic_codes.py` loop, on the same clips in one run.

    python -m tools.bench_prepare --size=tiny,medium --lines=24 [--workers=2]

The official loop (finetune_codes/extract_semantic_codes.py via `KimiAPromptManager
._tokenize_audio` -> glm4_utils `extract_speech_token`) is reimplemented with the same steps: per
jsonl line, per audio message, `librosa.load(path, sr=16000)`, transformers
`WhisperFeatureExtractor` (padding "longest", pad_to_multiple_of 1280) and a torch WhisperVQ
encoder, ONE clip per call, codes + offset written back. The torch encoder is the twin of
tools/bench_tokenizer.py (transformers layers, same random weights loaded by our converter), so
the token agreement is printed too.

Ours:
  * extract_codes: `data.extract_codes.extract` (batched JAX tokenizer, `--batch_size` clips per
    call) on the same jsonl;
  * prepare/1: `data.prepare`'s pipeline on the same jsonl (sft family: load, tokenize, text ids,
    records, ArrayRecord shards, card), DirectRunner in-process;
  * prepare/N: the same with `--direct_num_workers=N --direct_running_mode=multi_processing`.
Metric: hours of audio per wall-clock hour (= audio s / wall s), and per core used. Clips: the
bundled real speech (LibriSpeech demo clips, Kimi-Audio's spoken question, synthetic en), cycled.
Each measurement is one cold run including model load / compile (what a preparation job pays once
per worker), plus a warm second pass of extract_codes (steady state, compile amortised).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

# --size (tiny, medium, large) is tools.bench_tokenizer's flag: same shapes, same torch twin
from tools.bench_tokenizer import _SIZE, SHAPES, _glm_config, _torch_glm

_LINES = flags.DEFINE_integer("lines", 24, "jsonl lines (one audio message each)")
_WORKERS = flags.DEFINE_integer("workers", 2, "DirectRunner multi-processing workers")
_BATCH = flags.DEFINE_integer("batch_size", 8, "our clips per tokenizer call")
_CLIPS = flags.DEFINE_list(
    "clips",
    [
        "tests/fixtures/training/audios/librispeech_1263-139804-0001.flac",
        "tests/fixtures/training/audios/librispeech_1263-139804-0002.flac",
        "tests/fixtures/training/audios/librispeech_1263-139804-0005.flac",
        "tests/fixtures/data/kimi_qa_example.flac",
        "tests/fixtures/data/en_digits_16k.flac",
    ],
    "audio files cycled over the lines",
)
OFFSET = 152064


def make_jsonl(path: Path, n: int, clips: list[str]) -> float:
    """n official SFT lines (ASR), returns the seconds of audio."""
    import soundfile as sf

    lines, secs = [], 0.0
    for i in range(n):
        c = str(Path(clips[i % len(clips)]).resolve())
        secs += sf.info(c).duration
        lines.append(
            {
                "task_type": "understanding",
                "conversation": [
                    {"role": "user", "message_type": "text", "content": "Transcribe."},
                    {"role": "user", "message_type": "audio", "content": c},
                    {"role": "assistant", "message_type": "text", "content": f"line {i}"},
                ],
            }
        )
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return secs


def official_loop(src: Path, dst: Path, ref, fe) -> dict[str, list[int]]:
    """extract_semantic_codes.py, step for step (one clip per tokenizer call)."""
    import librosa
    import torch

    out, codes = [], {}
    for line in src.read_text().splitlines():
        rec = json.loads(line)
        for m in rec["conversation"]:
            if m["message_type"] == "audio":
                wav, _ = librosa.load(m["content"], sr=16000)
                with torch.no_grad():
                    segs = [wav[i : i + 480000] for i in range(0, len(wav), 480000)]
                    feats = fe(
                        segs,
                        sampling_rate=16000,
                        return_attention_mask=True,
                        return_tensors="pt",
                        padding="longest",
                        pad_to_multiple_of=1280,
                    )
                    ids, valid = ref(feats.input_features, feats.attention_mask)
                    toks = [int(t) for i in range(ids.shape[0]) for t in ids[i][valid[i].bool()]]
                m["audio_tokens"] = [t + OFFSET for t in toks]
                codes[m["content"]] = toks
        out.append(json.dumps(rec, ensure_ascii=False))
    dst.write_text("\n".join(out) + "\n")
    return codes


def main(argv: list[str]) -> None:
    del argv
    import jax
    import torch
    import transformers
    from safetensors.torch import save_file

    from data import pipeline, sft_codes
    from kimia_jax.audio import GlmTokenizer
    from kimia_jax.testing.tokenizer import write_tiny_tokenizer

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), fp32"
    )
    header = (
        "| size | method | audio s | wall s | h audio / h | per core | vs official | agreement |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "data.jsonl"
        audio_s = make_jsonl(src, _LINES.value, _CLIPS.value)
        text_tok = write_tiny_tokenizer(work / "text_tok")
        for size in _SIZE.value:
            d, h, f, _, n, v = SHAPES[size]
            cfg = _glm_config(d, h, f, n, v, pool=1 if size == "tiny" else n)
            ref = _torch_glm(cfg)
            folder = work / f"glm_{size}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(cfg))
            save_file(
                {k: t.contiguous() for k, t in ref.state_dict().items()},
                folder / "model.safetensors",
            )
            fe = transformers.WhisperFeatureExtractor(feature_size=128)

            def row(method, wall, cores, base, agree="", size=size):
                r = (
                    f"| {size} | {method} | {audio_s:.0f} | {wall:.1f} | {audio_s / wall:.1f} | "
                    f"{audio_s / wall / cores:.1f} | {base / wall:.2f}x | {agree} |"
                )
                print(r, flush=True)
                rows.append(r)

            t0 = time.perf_counter()
            want = official_loop(src, work / "official.jsonl", ref, fe)
            t_off = time.perf_counter() - t0
            row("official loop (torch, 1 clip/call)", t_off, 1, t_off)

            t0 = time.perf_counter()
            tok = GlmTokenizer.from_pretrained(folder, max_batch=_BATCH.value)
            lines = [json.loads(x) for x in src.read_text().splitlines()]
            got, _ = sft_codes.extract(lines, tok, work, offset=OFFSET, batch_size=_BATCH.value)
            t_ext = time.perf_counter() - t0
            ours = {
                m["content"]: [t - OFFSET for t in m["audio_tokens"]]
                for r in got
                for m in r["conversation"]
                if m["message_type"] == "audio"
            }
            agree = np.mean([a == b for k in want for a, b in zip(want[k], ours[k], strict=True)])
            row("data.extract_codes (JAX, batched), cold", t_ext, 1, t_off, f"{agree:.4f}")
            t0 = time.perf_counter()  # warm: the tokenizer already compiled its shapes
            sft_codes.extract(lines, tok, work, offset=OFFSET, batch_size=_BATCH.value)
            row("data.extract_codes (JAX, batched), warm", time.perf_counter() - t0, 1, t_off)

            for workers in (1, _WORKERS.value):
                out = work / f"prep_{size}_{workers}"
                args = ["--runner=DirectRunner"]
                if workers > 1:
                    args += [
                        f"--direct_num_workers={workers}",
                        "--direct_running_mode=multi_processing",
                    ]
                pc = pipeline.PrepareConfig(
                    str(out),
                    str(folder),
                    str(text_tok),
                    num_shards=max(2, workers),
                    batch_size=_BATCH.value,
                )
                t0 = time.perf_counter()
                pipeline.run(str(src), pc, args)
                t_prep = time.perf_counter() - t0
                row(f"data.prepare DirectRunner x{workers}", t_prep, workers, t_off)
                shutil.rmtree(out)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    app.run(main)

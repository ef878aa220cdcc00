"""`make demo`: Kimi-Audio end to end on a tiny random checkpoint the repo makes itself.

    python -m experiments.demo --workdir demo_out

1. writes a tiny Kimi-Audio folder with all five parts in the released layout
   (LLM shards + tokenizer, GLM-4-Voice tokenizer, whisper-large-v3, detokenizer, vocoder),
2. converts it to Orbax checkpoints (verified, atomic; `kimia_jax.conversion.kimia.convert_all`),
3. ASR on a bundled English clip (output_type "text"),
4. a spoken question answered with text and speech (output_type "both"), written to a wav,
   once in one call and once streaming.
Tiny random weights produce random words and noise; the same code runs the real checkpoint
(README "Using the real weights"). About 2 minutes on 2 CPU cores, mostly compilation.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from absl import app, flags, logging

ASSETS = Path(__file__).parent / "assets"

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Where the tiny checkpoints and outputs go.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from kimia_jax.conversion.kimia import convert_all
    from kimia_jax.detokenizer.wav import write_wav
    from kimia_jax.inference.api import KimiAudio
    from kimia_jax.testing import tiny_kimia

    work = Path(_WORKDIR.value)
    hf_dir, orbax_dir = work / "tiny-Kimi-Audio-7B-Instruct", work / "tiny-kimia-orbax"
    for d in (hf_dir, orbax_dir):
        shutil.rmtree(d, ignore_errors=True)

    t0 = time.perf_counter()
    tiny_kimia.write(hf_dir)
    print(
        f"[1/4] wrote a tiny released-layout Kimi-Audio folder to {hf_dir} "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    t0 = time.perf_counter()
    convert_all(hf_dir, orbax_dir, dtype="float32", detokenizer=True)
    print(f"[2/4] converted all parts to Orbax under {orbax_dir} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    model = KimiAudio(orbax_dir, load_detokenizer=True, dtype="float32")
    print(f"      loaded KimiAudio from the Orbax folder ({time.perf_counter() - t0:.1f}s)")

    asr = [
        {"role": "user", "message_type": "text", "content": "请将音频内容转换为文字。"},
        {"role": "user", "message_type": "audio", "content": str(ASSETS / "en_fox_16k.wav")},
    ]
    t0 = time.perf_counter()
    _, text = model.generate(asr, output_type="text", max_new_tokens=32)
    print(f"[3/4] ASR of en_fox_16k.wav ({time.perf_counter() - t0:.1f}s): {text!r}")
    print(f"      {model.timings.summary()}")

    chat = [
        {
            "role": "user",
            "message_type": "audio",
            "content": str(ASSETS / "en_question_44k_stereo.wav"),
        }
    ]
    t0 = time.perf_counter()
    wav, text = model.generate(chat, output_type="both", audio_temperature=0.8, audio_top_k=10)
    out_wav = work / "reply.wav"
    if wav is not None:
        write_wav(out_wav, wav)
    print(
        f"[4/4] spoken question -> text + speech ({time.perf_counter() - t0:.1f}s): "
        f"{text[:60]!r}..."
    )
    print(f"      {model.timings.summary()}")
    if wav is not None:
        print(f"      wrote {out_wav}: {len(wav) / 24000:.2f} s at 24 kHz")
    t0 = time.perf_counter()
    first, n_audio, n_text = None, 0, 0
    for piece in model.generate_stream(
        chat, output_type="both", audio_temperature=0.8, audio_top_k=10
    ):
        if piece["audio"] is not None:
            first = first or time.perf_counter() - t0
            n_audio += len(piece["audio"])
        n_text += len(piece["text"])
    first_s = f"{first:.2f}s" if first is not None else "n/a"
    print(
        f"      streaming: {n_audio / 24000:.2f} s of audio, {n_text} text chars, "
        f"first audio chunk after {first_s}"
    )
    print()
    print("NOTE: these are tiny RANDOM weights, so the words and the audio are random.")
    print(
        "For real output download moonshotai/Kimi-Audio-7B-Instruct and "
        "THUDM/glm-4-voice-tokenizer,"
    )
    print(
        "then: python -m experiments.infer --model_path <folder> --glm_tokenizer <folder> "
        "--task asr --audio <wav>"
    )


if __name__ == "__main__":
    app.run(main)

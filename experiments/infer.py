"""Kimi-Audio inference launcher.

    python -m experiments.infer --model_path /data/Kimi-Audio-7B-Instruct --task asr \
        --audio speech.wav
    python -m experiments.infer --model_path /data/kimia-orbax --task chat --audio question.wav \
        --output_type both --out_wav reply.wav --audio_temperature 0.8 --audio_top_k 10

Tasks build the official prompts (README "Task recipes"): asr, qa (spoken question, text answer),
caption, emotion, sound (classification), chat (speech in, text or speech out). --prompt
overrides the task instruction. On the 7B checkpoint in bf16 expect ~20 GB of accelerator memory.
"""

from __future__ import annotations

import time

from absl import app, flags

# Instructions: asr = the official infer.py; emotion / sound = the Evalkit's MELD / VocalSound
# frames without the option lists (spec/evaluation.md §1.3); caption = a plain request (the
# Evalkit has no captioning prompt). qa / chat: the spoken audio is the whole prompt.
TASK_PROMPTS = {
    "asr": "请将音频内容转换为文字。",
    "caption": "Please describe the audio in detail.",
    "emotion": "Identify the predominant emotion in this speech.",
    "sound": "Identify the sound in the audio.",
    "qa": None,
    "chat": None,
}

_MODEL = flags.DEFINE_string(
    "model_path", None, "Released or converted model folder.", required=True
)
_AUDIO = flags.DEFINE_multi_string("audio", [], "Input audio file(s); several = a batch.")
_TASK = flags.DEFINE_enum("task", "asr", list(TASK_PROMPTS), "Which task prompt to build.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text instruction (overrides the task's).")
_OUTPUT = flags.DEFINE_enum("output_type", "text", ["text", "both"], "Text only, or text + speech.")
_OUT_WAV = flags.DEFINE_string(
    "out_wav", None, "Where to write the 24 kHz reply (output_type both)."
)
_GLM = flags.DEFINE_string("glm_tokenizer", None, "GLM-4-Voice tokenizer folder.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. data=1,fsdp=1,tensor=8.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", -1, "Text-mode budget (-1: 7500 - prompt).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling / detokenizer noise seed.")
_AT = flags.DEFINE_float("audio_temperature", 0.0, "Audio sampling temperature (0 = greedy).")
_AK = flags.DEFINE_integer("audio_top_k", 5, "Audio top-k.")
_TT = flags.DEFINE_float("text_temperature", 0.0, "Text sampling temperature (0 = greedy).")
_TK = flags.DEFINE_integer("text_top_k", 5, "Text top-k.")
_ARP = flags.DEFINE_float("audio_repetition_penalty", 1.0, "Audio repetition penalty.")
_ARW = flags.DEFINE_integer("audio_repetition_window_size", 64, "Audio penalty window.")
_TRP = flags.DEFINE_float("text_repetition_penalty", 1.0, "Text repetition penalty.")
_TRW = flags.DEFINE_integer("text_repetition_window_size", 16, "Text penalty window.")


def build_messages(task: str, audio: str, prompt: str | None) -> list[dict]:
    """The official message lists (README recipes)."""
    instruction = prompt if prompt is not None else TASK_PROMPTS[task]
    msgs = []
    if instruction:
        msgs.append({"role": "user", "message_type": "text", "content": instruction})
    msgs.append({"role": "user", "message_type": "audio", "content": audio})
    return msgs


def main(argv: list[str]) -> None:
    del argv
    from tqdm import tqdm

    from kimia_jax import sharding
    from kimia_jax.inference.api import KimiAudio

    if not _AUDIO.value:
        raise app.UsageError("--audio is required")
    t0 = time.perf_counter()
    mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
    with tqdm(total=1, desc="loading model") as bar:
        model = KimiAudio(_MODEL.value, load_detokenizer=_OUTPUT.value == "both",
                          dtype=_DTYPE.value, mesh=mesh,
                          glm_tokenizer_path=_GLM.value)  # fmt: skip
        bar.update(1)
    load_s = time.perf_counter() - t0
    chats = [build_messages(_TASK.value, a, _PROMPT.value) for a in _AUDIO.value]
    sampling = dict(
        audio_temperature=_AT.value, audio_top_k=_AK.value, text_temperature=_TT.value,
        text_top_k=_TK.value, audio_repetition_penalty=_ARP.value,
        audio_repetition_window_size=_ARW.value, text_repetition_penalty=_TRP.value,
        text_repetition_window_size=_TRW.value,
    )  # fmt: skip
    results = model.generate_batch(chats, _OUTPUT.value, max_new_tokens=_MAX_NEW.value,
                                   seed=_SEED.value, **sampling)  # fmt: skip
    for i, (path, (wav, text)) in enumerate(zip(_AUDIO.value, results, strict=True)):
        print(f"{path}: {text}")
        if wav is not None and _OUT_WAV.value:
            from kimia_jax.detokenizer.wav import write_wav

            out = _OUT_WAV.value
            if len(results) > 1:
                out = out.removesuffix(".wav") + f"_{i}.wav"
            write_wav(out, wav)
            print(f"  wrote {out} ({len(wav) / 24000:.2f} s at 24 kHz)")
    print(f"timing: load {load_s:.1f}s, {model.timings.summary()}")


if __name__ == "__main__":
    app.run(main)

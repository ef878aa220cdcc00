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

import dataclasses
import time

from absl import app, flags

from kimia_jax.configs import OutputType
from kimia_jax.inference.sampler import Sampling

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
_OUTPUT = flags.DEFINE_enum(
    "output_type", "text", [t.value for t in OutputType], "Text only, or text + speech."
)
_OUT_WAV = flags.DEFINE_string(
    "out_wav", None, "Where to write the 24 kHz reply (output_type both)."
)
_GLM = flags.DEFINE_string("glm_tokenizer", None, "GLM-4-Voice tokenizer folder.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. data=1,fsdp=1,tensor=8.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling / detokenizer noise seed.")


def _define_sampling_flags() -> dict[str, flags.FlagHolder]:
    """One flag per `Sampling` field: its name, type, default and help (nothing re-typed)."""
    define = {"float": flags.DEFINE_float, "int": flags.DEFINE_integer}
    return {
        f.name: define[f.type if isinstance(f.type, str) else f.type.__name__](
            f.name, f.default, f.metadata["help"]
        )
        for f in dataclasses.fields(Sampling)
    }


_SAMPLING = _define_sampling_flags()


def sampling_from_flags() -> Sampling:
    return Sampling(**{name: holder.value for name, holder in _SAMPLING.items()})


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
    sampling = dataclasses.asdict(sampling_from_flags())
    results = model.generate_batch(chats, _OUTPUT.value, seed=_SEED.value, **sampling)
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

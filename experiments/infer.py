"""Kimi-Audio inference launcher: single clips, or batch jobs over a manifest.

  One or more clips (text answers printed as "<path>: <text>"):
    python -m experiments.infer --model_path /data/Kimi-Audio-7B-Instruct --task asr
        --audio speech.wav
  Speech reply:
    python -m experiments.infer --model_path /data/kimia-orbax --task chat --audio q.wav
        --output_type both --out_wav reply.wav --audio_temperature 0.8 --audio_top_k 10
  Batch job (jsonl in, jsonl out; resumable, per-request errors never stop the job):
    python -m experiments.infer --model_path /data/kimia-orbax --manifest requests.jsonl
        --output results.jsonl

Tasks build the official prompts (README "Task recipes"): asr, qa (spoken question, text
answer), caption, emotion, sound (classification), chat (speech in, text or speech out).
--prompt overrides the task instruction. Manifest lines: {"id", "messages"} or {"id", "audio",
"task" / "prompt"}; result lines: {"id", "text", "wav", "timings", "error"}
(kimia_jax/inference/batch.py). On the 7B checkpoint in bf16 expect ~20 GB of accelerator
memory.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from kimia_jax.configs import OutputType
from kimia_jax.inference.batch import TASK_PROMPTS, task_messages
from kimia_jax.inference.sampler import Sampling

_MODEL = flags.DEFINE_string("model_path", None, "Released or converted model folder.")
_AUDIO = flags.DEFINE_multi_string("audio", [], "Input audio file(s); several = one batch.")
_MANIFEST = flags.DEFINE_string(
    "manifest", None, "Batch job: jsonl of requests (one per line, each with an id)."
)
_RESULTS = flags.DEFINE_string(
    "output", None, "Batch job: results jsonl (appended; ids already there are skipped)."
)
_RETRY = flags.DEFINE_bool("retry_errors", False, "Batch job: run again ids that had an error.")
_WAV_DIR = flags.DEFINE_string(
    "wav_dir", None, "Batch job, output_type both: folder for <id>.wav (default <output>.wavs/)."
)
_TASK = flags.DEFINE_enum("task", "asr", list(TASK_PROMPTS), "Which task prompt to build.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text instruction (overrides the task's).")
_OUTPUT = flags.DEFINE_enum(
    "output_type", "text", [t.value for t in OutputType], "Text only, or text + speech."
)
_OUT_WAV = flags.DEFINE_string(
    "out_wav", None, "Where to write the 24 kHz reply (needed by, and only for, output_type both)."
)
_VOICE = flags.DEFINE_string(
    "voice_prompt",
    None,
    "Reference clip whose voice the spoken replies take (the detokenizer's prefill); needs "
    "--output_type both.",
)
_GLM = flags.DEFINE_string("glm_tokenizer", None, "GLM-4-Voice tokenizer folder.")
_QUANT_DETOK = flags.DEFINE_enum(
    "quantize_detokenizer", "none", ["none", "int8"],
    "int8 weight-only detokenizer DiT (--output_type both; the vocoder stays float).",
)  # fmt: skip
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. data=1,fsdp=1,tensor=8.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    None,
    ["none", "int8", "int4"],
    "Weight-only quantization of the LLM (int8: per output channel; compute in --dtype). Unset: "
    "as the model folder stores it (a folder converted with --quantize=int8 loads as int8).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling / detokenizer noise seed.", lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Requests per compiled call.", lower_bound=1)
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", ["debug", "info", "warning", "error"],
    "Library and Orbax log lines shown (info: Orbax's restore lines, JAX's backend notes).",
)  # fmt: skip
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars, errors only in the log.")


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
    return task_messages(task, audio, prompt)


def _set_log_level(level: str) -> None:
    """absl (ours and Orbax's INFO lines) and JAX's python loggers (the TPU-backend warning)."""
    logging.set_verbosity(level)
    quiet_jax = py_logging.ERROR if level in ("warning", "error") else py_logging.INFO
    for name in ("jax._src.xla_bridge", "jax._src.compiler", "absl"):
        py_logging.getLogger(name).setLevel(quiet_jax if name != "absl" else level.upper())


def check_flags() -> None:
    """Every flag and path checked before the model loads (minutes for the 7B)."""
    if not _MODEL.value:
        raise app.UsageError("--model_path is required")
    if _RESULTS.value and not _MANIFEST.value:
        raise app.UsageError("--output is the batch results file: it needs --manifest")
    if bool(_AUDIO.value) == bool(_MANIFEST.value):
        raise app.UsageError("give either --audio (one or more clips) or --manifest (a batch job)")
    if _MANIFEST.value and not _RESULTS.value:
        raise app.UsageError("--manifest needs --output (the results jsonl)")
    both = _OUTPUT.value == OutputType.BOTH.value
    if _AUDIO.value:
        if both and not _OUT_WAV.value:
            raise app.UsageError(
                "--output_type both writes the spoken reply: give --out_wav (or use "
                "--output_type text)"
            )
        if not both and _OUT_WAV.value:
            raise app.UsageError(
                "--out_wav is only written with --output_type both (text mode makes no audio)"
            )
        for a in _AUDIO.value:
            if Path(a).is_dir():
                raise app.UsageError(f"--audio {a} is a folder, not an audio file")
            if not Path(a).is_file():
                raise app.UsageError(f"--audio {a} does not exist")
    elif _OUT_WAV.value:
        raise app.UsageError("--out_wav is for --audio runs; batch jobs write to --wav_dir")
    if _OUT_WAV.value:
        parent = Path(_OUT_WAV.value).absolute().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise app.UsageError(f"--out_wav: cannot write into {parent}")
    if _VOICE.value:
        if not both:
            raise app.UsageError("--voice_prompt sets the voice of spoken replies: it needs "
                                 "--output_type both")  # fmt: skip
        if not Path(_VOICE.value).is_file():
            raise app.UsageError(f"--voice_prompt {_VOICE.value} is not an audio file")
    if _MESH.value:
        from kimia_jax import sharding

        sharding.parse_mesh(_MESH.value)


class Bars:
    """`pipeline.Progress` as tqdm bars, one per stage (none with --quiet)."""

    UNITS = {"load": "part", "encode": "clip", "decode": "step", "detokenize": "reply"}

    def __init__(self, enabled: bool):
        self.enabled, self.bars = enabled, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = self.bars[stage] = tqdm(
                total=total, desc=f"{stage:<10}", unit=self.UNITS.get(stage, "it"), leave=False
            )
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


_BARS = Bars(False)


def _load_model(progress: Bars):
    from kimia_jax import sharding
    from kimia_jax.configs import layout
    from kimia_jax.conversion.kimia import check_model_folder
    from kimia_jax.inference.api import KimiAudio

    root = Path(_MODEL.value)
    if not root.is_dir():
        raise app.UsageError(f"--model_path {root} is not a folder")
    glm = Path(_GLM.value) if _GLM.value else root / layout.GLM_TOKENIZER_DIR
    both = _OUTPUT.value == OutputType.BOTH.value
    check_model_folder(root, glm, load_detokenizer=both, glm_arg="--glm_tokenizer")
    mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
    return KimiAudio(root, load_detokenizer=both, dtype=_DTYPE.value, mesh=mesh,
                     glm_tokenizer_path=glm, max_batch=_BATCH.value,
                     progress=progress, quantize=_QUANTIZE.value,
                     quantize_detokenizer=_QUANT_DETOK.value if both else None)  # fmt: skip


def format_answer(path: str, text: str) -> str:
    """`<path>: <text>`; a multi-line answer goes on indented lines below `<path>:`, so every
    answer's lines stay apart from the next path (machine-readable output: --manifest)."""
    if "\n" not in text:
        return f"{path}: {text}"
    return f"{path}:\n" + "\n".join(f"  {line}" for line in text.splitlines())


def _run_clips(model, sampling: dict) -> None:
    from kimia_jax.detokenizer.wav import write_wav

    chats = [build_messages(_TASK.value, a, _PROMPT.value) for a in _AUDIO.value]
    results = model.generate_batch(chats, _OUTPUT.value, seed=_SEED.value, **sampling)
    for i, (path, (wav, text)) in enumerate(zip(_AUDIO.value, results, strict=True)):
        print(format_answer(path, text))
        if _OUTPUT.value == OutputType.BOTH.value:
            if wav is None:
                print(f"  no speech generated for {path}: nothing written", file=sys.stderr)
                continue
            out = _OUT_WAV.value
            if len(results) > 1:
                out = out.removesuffix(".wav") + f"_{i}.wav"
            write_wav(out, wav)
            print(f"  wrote {out} ({len(wav) / 24000:.2f} s at 24 kHz)")


def _run_manifest(model, sampling: dict, requests, log, quiet: bool) -> None:
    from tqdm import tqdm

    from kimia_jax.inference import batch

    wav_dir = None
    if _OUTPUT.value == OutputType.BOTH.value:
        wav_dir = Path(_WAV_DIR.value or f"{_RESULTS.value}.wavs")
    bar = None if quiet else tqdm(total=len(requests), desc="requests", unit="req")

    def on_batch(done: int, total: int) -> None:
        if bar is not None:
            bar.n = min(done + skipped_or_bad[0], len(requests))
            bar.refresh()

    skipped_or_bad = [0]
    todo = [r for r in requests if r.id not in log.done or _RETRY.value]
    skipped_or_bad[0] = len(requests) - len([r for r in todo if r.error is None])
    counts = batch.run(model, requests, log, output_type=_OUTPUT.value, wav_dir=wav_dir,
                       batch_size=_BATCH.value, seed=_SEED.value, sampling=sampling,
                       retry_errors=_RETRY.value, on_batch=on_batch)  # fmt: skip
    if bar is not None:
        bar.close()
    print(f"{_RESULTS.value}: {counts['ok']} results, {counts['errors']} errors, "
          f"{counts['skipped']} already done")  # fmt: skip


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _set_log_level("error" if _QUIET.value else _LOG_LEVEL.value)
    check_flags()
    sampling = dataclasses.asdict(sampling_from_flags())  # bad values fail before loading too
    requests = log = None
    if _MANIFEST.value:
        from kimia_jax.inference import batch

        requests = batch.read_manifest(_MANIFEST.value, _TASK.value)
        log = batch.ResultLog(_RESULTS.value)
    t0 = time.perf_counter()
    _BARS.enabled = not _QUIET.value
    model = _load_model(_BARS)
    load_s = time.perf_counter() - t0
    if _VOICE.value:  # built once (GLM tokens + mel + DiT prefill), used by every reply
        sampling["voice_prompt"] = model.voice_prompt(_VOICE.value)
    if requests is not None:
        _run_manifest(model, sampling, requests, log, _QUIET.value)
    else:
        _run_clips(model, sampling)
    print(f"timing: load {load_s:.1f}s, {model.timings.summary()}")


def run() -> None:
    """`app.run(main)`, with library errors (bad input, damaged checkpoint, missing file) shown
    as one line, `error: <message>`, and exit status 1: no traceback wall."""
    from kimia_jax.errors import KimiaError

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except (KimiaError, OSError) as e:
            logging.debug("failed", exc_info=True)
            _BARS.close()
            sys.stdout.flush()
            print(f"error: {e}", file=sys.stderr)
            sys.stderr.flush()
            # No interpreter teardown: a failed TensorStore read leaves sibling reads in flight
            # whose callbacks, once Orbax has closed its event loop, print "Event loop is
            # closed" / "sys.meta_path is None" tracebacks at shutdown, after our line.
            os._exit(1)

    app.run(guarded)


if __name__ == "__main__":
    run()

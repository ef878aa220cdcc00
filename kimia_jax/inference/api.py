"""`KimiAudio`: the official inference API, batched and compiled.

    model = KimiAudio(model_path="/data/Kimi-Audio-7B-Instruct", load_detokenizer=True)
    wav, text = model.generate(messages, output_type="text" | "both", **sampling)

Mirrors `kimia_infer.api.kimia.KimiAudio` (spec/llm.md §9): same message format, same sampling
arguments and defaults (`Sampling`), same budgets and returned values; `generate_batch` runs several
chats in one compiled call, `generate_stream` yields text pieces and 24 kHz audio chunks as they
come. A thin facade over the stages of `inference/pipeline.py`; `output_type` is validated here,
once (`OutputType.parse`), and the stages take the enum.

Model folder: the released layout (`config.json` + safetensors, `tiktoken.model`,
`whisper-large-v3/`, `audio_detokenizer/` + `vocoder/`; the GLM-4-Voice tokenizer, which the
official code fetches from the hub, is looked up as `glm-4-voice-tokenizer/` next to them or given
by `glm_tokenizer_path`) or the same layout converted to Orbax by `tools/convert_kimia.py`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from kimia_jax.audio.io import load_audio
from kimia_jax.configs import OutputType, layout
from kimia_jax.conversion import llm as llm_conv
from kimia_jax.conversion.kimia import check_model_folder
from kimia_jax.detokenizer.detokenizer import VoicePrompt
from kimia_jax.errors import CheckpointNotFoundError, OutputError, PromptError
from kimia_jax.inference import pipeline
from kimia_jax.inference.sampler import Sampling
from kimia_jax.inference.stream_logic import StreamConfig
from kimia_jax.layers import quant
from kimia_jax.models.kimia_llm import KimiaLLM
from kimia_jax.text import conversation as prompt_lib
from kimia_jax.text.conversation import AUDIO_DELAY
from kimia_jax.text.tokenizer import TextTokenizer

Messages = pipeline.Messages


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass
class Timings:
    """Seconds spent per stage of the last call (for launchers' summaries)."""

    prompt_s: float = 0.0
    generate_s: float = 0.0
    detokenize_s: float = 0.0
    steps: int = 0

    def summary(self) -> str:
        rate = self.steps / self.generate_s if self.generate_s else 0.0
        return (f"prompt {self.prompt_s:.2f}s, generate {self.generate_s:.2f}s "
                f"({self.steps} steps, {rate:.1f} steps/s), "
                f"detokenize {self.detokenize_s:.2f}s")  # fmt: skip


def _sampling_signature(fn: Any) -> Any:
    """Shows the official keyword arguments (the `Sampling` fields) in `fn`'s signature."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in dataclasses.fields(Sampling)
    ]
    fn.__signature__ = sig.replace(parameters=params)
    return fn


class KimiAudio:
    """Kimi-Audio inference: audio tokenizer + LLM + (optionally) detokenizer.

    Args:
      model_path: released (or converted) model folder.
      load_detokenizer: load the detokenizer and vocoder (needed for output_type "both" audio).
      dtype: LLM / encoder compute dtype ("bfloat16" as the official runtime, "float32" exact).
      mesh: device mesh for the LLM (None: default device). Each instance runs its compiled
        calls under its own mesh (JAX's context mesh), so instances on different meshes can be
        used alternately in one process.
      glm_tokenizer_path: GLM-4-Voice tokenizer folder (default
        `<model_path>/glm-4-voice-tokenizer`).
      prompt_version: prompt builder version ("349251e" default; see text/conversation.py).
      max_batch: rows per compiled generation call in `generate_batch`.
      progress: optional `progress(stage, done, total)` callback (loading, encoding, decoding
        steps, detokenizing; see `pipeline.Progress`); settable later as `.progress`.
      quantize: weight-only quantization of the LLM (`layers.quant`, `modules=quant.DECODE`:
        every layer projection, both vocabulary heads and the embedding table, int8 per output
        channel or int4 per 64 inputs); compute stays in `dtype`.
        None (default): the LLM weights as the folder stores them: a folder converted with
        `--quantize=int8` (`tools.convert_kimia`) is loaded as int8 directly, its float weights
        never exist (half the peak memory of quantizing on load); a float folder stays float.
        "int8" / "int4": quantize a float folder on load (a released folder tensor by tensor as
        it is read: the quantized model plus one float weight of memory; a converted float
        folder after restoring it: the `dtype` model plus one weight); on a quantized folder
        the kind must be the stored one. "none": float weights. A quantized folder asked for
        another kind (or "none") raises `QuantizeMismatchError` before any weight is read.
        `.quantize` is what was loaded. Measured agreement with the float model:
        tests/inference/quant_test.py.
      quantize_detokenizer: None or "int8": the detokenizer DiT's matrices int8 weight-only
        (`Detokenizer(quantize=)`, applied on load; the vocoder stays float). Measured error:
        tests/detokenizer/quant_test.py.

    Every argument and the model folder are checked before any weight is read
    (`conversion.kimia.check_model_folder`): a missing part or a damaged converted checkpoint
    is named with the command that re-creates it.
    """

    kimia_text_audiodelaytokens = AUDIO_DELAY

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        load_detokenizer: bool = True,
        *,
        dtype: str = "bfloat16",
        mesh: Mesh | None = None,
        glm_tokenizer_path: str | os.PathLike[str] | None = None,
        prompt_version: str = "349251e",
        max_batch: int = 8,
        progress: pipeline.Progress | None = None,
        quantize: str | None = None,
        quantize_detokenizer: str | None = None,
    ):
        from kimia_jax.audio.tokenizer import GlmTokenizer, WhisperFeatureExtractor

        root = Path(model_path)
        if not root.is_dir():
            raise CheckpointNotFoundError(
                f"model_path {root} "
                + ("is a file, not a model folder" if root.exists() else "does not exist")
            )
        _check_int("max_batch", max_batch, 1)
        if quantize not in (None, "none", *quant.KINDS):
            raise ValueError(
                f"quantize must be None, 'none' or one of {quant.KINDS}, got {quantize!r}"
            )
        if quantize_detokenizer not in (None, "none", "int8"):
            raise ValueError(
                f"quantize_detokenizer must be None, 'none' or 'int8', got {quantize_detokenizer!r}"
            )
        if quantize_detokenizer not in (None, "none") and not load_detokenizer:
            raise ValueError("quantize_detokenizer needs load_detokenizer=True")
        glm_path = Path(glm_tokenizer_path or root / layout.GLM_TOKENIZER_DIR)
        check_model_folder(
            root, glm_path, load_detokenizer=load_detokenizer,
            glm_arg="glm_tokenizer_path" if glm_tokenizer_path else None,
        )  # fmt: skip
        # what the LLM will be (and a mismatched `quantize`), from the meta file alone
        self.quantize = llm_conv.resolve_quantize(root, quantize)
        self.model_path, self.mesh, self.max_batch = root, mesh, max_batch
        self.progress = progress
        parts = 4 + bool(load_detokenizer)
        self._report("load", 0, parts)
        t0 = time.perf_counter()
        self.cfg, self.params = llm_conv.load(root, dtype=dtype, mesh=mesh, quantize=quantize)
        self._report("load", 1, parts)
        self.model = KimiaLLM(self.cfg)
        self.tokenizer = TextTokenizer.from_pretrained(root)
        self.extra_tokens = self.tokenizer.extra_tokens
        self.kimia_token_offset = self.cfg.kimia_token_offset
        self.eod_ids = [self.extra_tokens.msg_end, self.extra_tokens.media_end]
        self.text_decoder = pipeline.TextDecoder(
            self.kimia_token_offset, self.extra_tokens.kimia_text_eos, self.tokenizer.decode
        )
        self._report("load", 2, parts)
        self.audio_tokenizer = GlmTokenizer.from_pretrained(glm_path)
        self._report("load", 3, parts)
        self.whisper = (
            WhisperFeatureExtractor.from_pretrained(root / layout.WHISPER_DIR, dtype=dtype)
            if self.cfg.use_whisper_feature
            else None
        )
        self._report("load", 4, parts)
        # Single-clip audio functions for direct `prompt_builder.build` calls; the API's calls
        # encode all clips of a request in one batched call (`pipeline.encode_audio`).
        self.prompt_builder = prompt_lib.PromptBuilder.from_tokenizer(
            self.tokenizer,
            lambda a: self.audio_tokenizer.tokenize([load_audio(a)])[0],
            (lambda a: self.whisper.features([load_audio(a)])[0]) if self.whisper else None,
            kimia_token_offset=self.kimia_token_offset,
            num_audio_codes=self.cfg.vocab_size - self.kimia_token_offset,
            version=prompt_version,
        )
        self.detokenizer = None
        if load_detokenizer:
            from kimia_jax.detokenizer.detokenizer import Detokenizer

            # the released audio_detokenizer/ + vocoder/, or the converted detokenizer/
            self.detokenizer = Detokenizer.from_pretrained(root, quantize=quantize_detokenizer)
        self._report("load", parts, parts)
        self.timings = Timings()
        logging.info("KimiAudio loaded from %s in %.1fs", root, time.perf_counter() - t0)

    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    # ------------------------------------------------------------------------------------------
    # Stages (inference/pipeline.py) bound to this model

    def prompts(
        self, chats: Sequence[Messages], output_type: OutputType
    ) -> list[prompt_lib.Prompt]:
        """Loads every clip of the chats once, encodes them in one batched call each, and builds
        one prompt per chat."""
        clips = pipeline.collect_audio(chats)
        wavs = pipeline.load_clips(clips)
        self._report("encode", 0, len(clips))
        audio = pipeline.encode_audio(wavs, clips, self.audio_tokenizer, self.whisper)
        self._report("encode", len(clips), len(clips))
        return pipeline.build_prompts(self.prompt_builder, chats, output_type, audio)

    def _check_output(self, output_type: OutputType | str) -> OutputType:
        output_type = OutputType.parse(output_type)
        if output_type == OutputType.BOTH and self.detokenizer is None:
            raise OutputError(
                'output_type="both" needs the detokenizer, which this model was loaded without '
                "(load_detokenizer=False): load it with load_detokenizer=True, or ask for "
                'output_type="text"'
            )
        return output_type

    def _stream_cfg(self, output_type: OutputType) -> StreamConfig:
        return StreamConfig.from_extra_tokens(self.extra_tokens, output_type)

    def detokenize_text(self, text_ids: Sequence[int]) -> str:
        return self.text_decoder.text(text_ids)

    def detokenize_audio(
        self, codes: np.ndarray, seed: int = 0, voice_prompt: Any = None
    ) -> np.ndarray:
        if self.detokenizer is None:
            raise RuntimeError("the detokenizer is not loaded (load_detokenizer=False)")
        return self.detokenizer.detokenize(
            np.asarray(codes).reshape(-1), key=seed, prompt=self.voice_prompt(voice_prompt)
        )

    def voice_prompt(self, audio: Any) -> VoicePrompt | None:
        """The detokenizer's voice prompt (official `prefill`, spec/detokenizer.md §4.6) of a
        reference clip: its GLM-4-Voice tokens (16 kHz) and its BigVGAN mel (24 kHz) condition
        the DiT, so the spoken replies take the clip's voice.

        `audio`: anything `load_audio` takes (a path, a 16 kHz array, `(array, rate)`), or an
        already built `VoicePrompt` (returned as is: build it once, reuse it for every request);
        None gives None. Raises if the detokenizer is not loaded.
        """
        if audio is None or isinstance(audio, VoicePrompt):
            return audio
        if self.detokenizer is None:
            raise OutputError(
                "voice_prompt conditions the detokenizer, which this model was loaded without "
                "(load_detokenizer=False)"
            )
        try:
            wav16 = load_audio(audio)
            wav24 = load_audio(audio, target_sr=self.detokenizer.vocoder_cfg.sampling_rate)
        except (OSError, ValueError) as e:
            raise PromptError(f"voice_prompt: {e}") from e
        tokens = self.audio_tokenizer.tokenize([wav16])[0]
        return self.detokenizer.prefill(wav24, np.asarray(tokens).reshape(-1))

    def _check_voice(self, voice_prompt: Any, output_type: OutputType) -> VoicePrompt | None:
        if voice_prompt is not None and output_type != OutputType.BOTH:
            raise OutputError(
                'voice_prompt sets the voice of spoken replies: it needs output_type="both"'
            )
        return self.voice_prompt(voice_prompt)

    # ------------------------------------------------------------------------------------------
    # The official API

    @_sampling_signature
    def generate_batch(
        self,
        chats: Sequence[Messages],
        output_type: OutputType | str = OutputType.TEXT,
        *,
        seed: int = 0,
        voice_prompt: Any = None,
        **sampling: Any,
    ) -> list[tuple[np.ndarray | None, str]]:
        """Several chats at once: one compiled call per `max_batch` rows; per-chat results as
        `generate` would return them (the rows stop independently). All audio of the call is
        loaded once and encoded in one batched tokenizer call and one feature call.
        `voice_prompt` (output_type "both"): a reference clip or `VoicePrompt` whose voice every
        reply takes (`voice_prompt()`)."""
        output_type = self._check_output(output_type)
        samp = Sampling(**sampling)
        _check_int("seed", seed, 0)
        voice = self._check_voice(voice_prompt, output_type)
        if isinstance(chats, (str, bytes)) or not isinstance(chats, Sequence):
            raise PromptError(f"chats must be a list of message lists, got {type(chats).__name__}")
        t0 = time.perf_counter()
        prompts = self.prompts(chats, output_type)
        self.timings = Timings(prompt_s=time.perf_counter() - t0)
        stream = self._stream_cfg(output_type)
        results: list[tuple[np.ndarray | None, str]] = []
        for start in range(0, len(prompts), self.max_batch):
            group = prompts[start : start + self.max_batch]
            batch = pipeline.plan_batch(group, output_type, samp.max_new_tokens, self.cfg)
            t1 = time.perf_counter()
            out = pipeline.run_generate(self.params, self.model, batch, stream, samp,
                                        jax.random.key(seed), self.mesh,
                                        self.progress)  # fmt: skip
            self.timings.generate_s += time.perf_counter() - t1
            self.timings.steps += out.steps
            both = output_type == OutputType.BOTH
            for r, (audio, text) in enumerate(out.tokens):
                codes, text_str = self.text_decoder.postprocess(audio, text)
                wav = None
                if both and codes.size:
                    t2 = time.perf_counter()
                    wav = self.detokenize_audio(codes, seed, voice)
                    self.timings.detokenize_s += time.perf_counter() - t2
                if both:
                    self._report("detokenize", r + 1, len(out.tokens))
                results.append((wav, text_str))
        return results

    @_sampling_signature
    def generate(
        self, chats: Messages, output_type: OutputType | str = OutputType.TEXT, *, seed: int = 0,
        voice_prompt: Any = None, **sampling: Any,
    ) -> tuple[np.ndarray | None, str]:  # fmt: skip
        """(24 kHz waveform or None, text) for one chat; the official keyword arguments and
        defaults (`Sampling`: audio_temperature, audio_top_k, ..., max_new_tokens).
        `voice_prompt`: speak in the voice of this reference clip (output_type "both")."""
        return self.generate_batch(
            [chats], output_type, seed=seed, voice_prompt=voice_prompt, **sampling
        )[0]

    @_sampling_signature
    def generate_stream(
        self,
        chats: Messages,
        output_type: OutputType | str = OutputType.BOTH,
        *,
        seed: int = 0,
        chunk_steps: int = 16,
        voice_prompt: Any = None,
        **sampling: Any,
    ) -> Iterator[dict[str, Any]]:
        """Yields {"text": new text piece, "audio": new 24 kHz samples or None, "steps": decode
        steps run so far} as they come (a `pipeline.StreamingGeneration`).

        The decode loop runs `chunk_steps` compiled steps at a time (`generate.resume`); audio
        codes go to the detokenizer chunk by chunk. Tokens equal those of `generate` for the same
        settings, and the audio pieces concatenate to `generate`'s waveform.
        """
        output_type = self._check_output(output_type)
        samp = Sampling(**sampling)
        _check_int("seed", seed, 0)
        _check_int("chunk_steps", chunk_steps, 1)
        voice = self._check_voice(voice_prompt, output_type)
        (prompt,) = self.prompts([chats], output_type)
        batch = pipeline.plan_batch([prompt], output_type, samp.max_new_tokens, self.cfg)
        return pipeline.StreamingGeneration(
            params=self.params, model=self.model, batch=batch,
            stream=self._stream_cfg(output_type), sampling=samp, text=self.text_decoder,
            detokenizer=self.detokenizer, seed=seed, mesh=self.mesh, chunk_steps=chunk_steps,
            voice_prompt=voice,
        )  # fmt: skip

"""`KimiAudio`: the official inference API, batched and compiled.

    model = KimiAudio(model_path="/data/Kimi-Audio-7B-Instruct", load_detokenizer=True)
    wav, text = model.generate(messages, output_type="text" | "both", **sampling)

Mirrors `kimia_infer.api.kimia.KimiAudio` (spec/llm.md §9): same message format, same sampling
arguments and defaults, same budgets and returned values; `generate_batch` runs several chats in
one compiled call, `generate_stream` yields text pieces and 24 kHz audio chunks as they come.

Model folder: the released layout (`config.json` + safetensors, `tiktoken.model`,
`whisper-large-v3/`, `audio_detokenizer/` + `vocoder/`; the GLM-4-Voice tokenizer, which the
official code fetches from the hub, is looked up as `glm-4-voice-tokenizer/` next to them or given
by `glm_tokenizer_path`) or the same layout converted to Orbax by `tools/convert_kimia.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from kimia_jax import sharding
from kimia_jax.configs import layout
from kimia_jax.conversion import llm as llm_conv
from kimia_jax.inference import generate as gen
from kimia_jax.inference import stream_logic
from kimia_jax.inference.sampler import SamplingParams
from kimia_jax.models.kimia_llm import KimiaLLM
from kimia_jax.text import conversation as prompt_lib
from kimia_jax.text.tokenizer import TextTokenizer

Messages = Sequence[Mapping[str, Any]]


def _bucket(n: int, quantum: int) -> int:
    """Rounds up to a multiple of `quantum` so that compiled shapes repeat across requests."""
    return max(quantum, -(-n // quantum) * quantum)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The official `generate` sampling arguments (defaults = `KimiAudio.generate` defaults)."""

    audio_temperature: float = 0.0
    audio_top_k: int = 5
    text_temperature: float = 0.0
    text_top_k: int = 5
    audio_repetition_penalty: float = 1.0
    audio_repetition_window_size: int = 64
    text_repetition_penalty: float = 1.0
    text_repetition_window_size: int = 16

    @property
    def text(self) -> SamplingParams:
        return SamplingParams(self.text_temperature, self.text_top_k, self.text_repetition_penalty,
                              self.text_repetition_window_size)  # fmt: skip

    @property
    def audio(self) -> SamplingParams:
        return SamplingParams(self.audio_temperature, self.audio_top_k,
                              self.audio_repetition_penalty,
                              self.audio_repetition_window_size)  # fmt: skip


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


class KimiAudio:
    """Kimi-Audio inference: audio tokenizer + LLM + (optionally) detokenizer.

    Args:
      model_path: released (or converted) model folder.
      load_detokenizer: load the detokenizer and vocoder (needed for output_type "both" audio).
      dtype: LLM / encoder compute dtype ("bfloat16" as the official runtime, "float32" exact).
      mesh: device mesh for the LLM (None: default device).
      glm_tokenizer_path: GLM-4-Voice tokenizer folder (default
        `<model_path>/glm-4-voice-tokenizer`).
      prompt_version: prompt builder version ("349251e" default; see text/conversation.py).
      max_batch: rows per compiled generation call in `generate_batch`.
    """

    kimia_text_audiodelaytokens = stream_logic.AUDIO_DELAY

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
    ):
        from kimia_jax.audio.tokenizer import GlmTokenizer, WhisperFeatureExtractor

        root = Path(model_path)
        if not root.is_dir():
            raise FileNotFoundError(f"model_path {root} is not a directory")
        self.model_path, self.mesh, self.max_batch = root, mesh, max_batch
        t0 = time.perf_counter()
        self.cfg, self.params = llm_conv.load(root, dtype=dtype, mesh=mesh)
        self.model = KimiaLLM(self.cfg)
        self.tokenizer = TextTokenizer.from_pretrained(root)
        self.extra_tokens = self.tokenizer.extra_tokens
        self.kimia_token_offset = self.cfg.kimia_token_offset
        self.eod_ids = [self.extra_tokens.msg_end, self.extra_tokens.media_end]
        glm_path = Path(glm_tokenizer_path or root / layout.GLM_TOKENIZER_DIR)
        if not glm_path.is_dir():
            raise FileNotFoundError(
                f"GLM-4-Voice tokenizer not found at {glm_path}: download "
                f"THUDM/glm-4-voice-tokenizer there or pass glm_tokenizer_path"
            )
        self.audio_tokenizer = GlmTokenizer.from_pretrained(glm_path)
        self.whisper = (
            WhisperFeatureExtractor.from_pretrained(root / layout.WHISPER_DIR, dtype=dtype)
            if self.cfg.use_whisper_feature
            else None
        )
        self.prompt_builder = prompt_lib.PromptBuilder.from_tokenizer(
            self.tokenizer,
            lambda a: self.audio_tokenizer.tokenize([a])[0],
            (lambda a: self.whisper.features([a])[0]) if self.whisper else None,
            kimia_token_offset=self.kimia_token_offset,
            num_audio_codes=self.cfg.vocab_size - self.kimia_token_offset,
            version=prompt_version,
        )
        self.detokenizer = None
        if load_detokenizer:
            from kimia_jax.detokenizer.detokenizer import Detokenizer

            # the released audio_detokenizer/ + vocoder/, or the converted detokenizer/
            self.detokenizer = Detokenizer.from_pretrained(root)
        self.timings = Timings()
        logging.info("KimiAudio loaded from %s in %.1fs", root, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------

    def _prompts(self, chats: Sequence[Messages], output_type: str) -> list[prompt_lib.Prompt]:
        if output_type not in ("text", "both"):
            raise ValueError(f"output_type must be 'text' or 'both', got {output_type!r}")
        if not chats:
            raise ValueError("no chats given")
        return [self.prompt_builder.build(list(m), output_type) for m in chats]

    def _batch(self, prompts: Sequence[prompt_lib.Prompt], max_new_tokens: int, output_type: str):
        lengths = [len(p) for p in prompts]
        budget = stream_logic.budgets(output_type, lengths, max_new_tokens)
        if (budget < 1).any():
            raise ValueError(
                f"prompt of {max(lengths)} positions leaves no generation budget "
                f"({'1500' if output_type == 'both' else '7500'} - T "
                f"for output_type {output_type!r})"
            )
        pad_to = _bucket(max(lengths), 64)
        max_steps = _bucket(int(budget.max()), 64)
        din = self.cfg.kimia_adaptor_input_dim if self.cfg.use_whisper_feature else None
        pb = prompt_lib.batch(prompts, pad_to, feature_dim=din)
        b = 1 << (len(prompts) - 1).bit_length()  # batch rows padded to a power of two
        rows = lambda x: np.concatenate([x, np.repeat(x[-1:], b - len(prompts), 0)])  # noqa: E731
        prompt = gen.Prompt(
            audio_ids=jnp.asarray(rows(pb.audio_ids)),
            text_ids=jnp.asarray(rows(pb.text_ids)),
            lengths=jnp.asarray(rows(pb.lengths)),
            features=None if pb.features is None else jnp.asarray(rows(pb.features)),
            continuous_mask=jnp.asarray(rows(pb.is_continuous)),
        )
        gen.check_prompt(self.cfg, prompt, max_steps, None)
        return prompt, jnp.asarray(rows(budget)), max_steps, pad_to + max_steps

    def _stream_cfg(self, output_type: str) -> stream_logic.StreamConfig:
        return stream_logic.StreamConfig.from_extra_tokens(self.extra_tokens, output_type)

    def _postprocess(self, audio: list[int], text: list[int]) -> tuple[np.ndarray, str]:
        return stream_logic.postprocess(
            audio, text, kimia_token_offset=self.kimia_token_offset,
            text_eos=self.extra_tokens.kimia_text_eos, decode_fn=self.tokenizer.decode,
        )  # fmt: skip

    def detokenize_text(self, text_ids: Sequence[int]) -> str:
        return stream_logic.detokenize_text(
            [t for t in text_ids if t < self.kimia_token_offset],
            self.extra_tokens.kimia_text_eos, self.tokenizer.decode,
        )  # fmt: skip

    def detokenize_audio(self, codes: np.ndarray, seed: int = 0) -> np.ndarray:
        if self.detokenizer is None:
            raise RuntimeError("the detokenizer is not loaded (load_detokenizer=False)")
        return self.detokenizer.detokenize(np.asarray(codes).reshape(-1), key=seed)

    # ------------------------------------------------------------------------------------------

    def generate_batch(
        self,
        chats: Sequence[Messages],
        output_type: str = "text",
        *,
        max_new_tokens: int = -1,
        seed: int = 0,
        **sampling: Any,
    ) -> list[tuple[np.ndarray | None, str]]:
        """Several chats at once: one compiled call per `max_batch` rows; per-chat results as
        `generate` would return them (the rows stop independently)."""
        samp = Sampling(**sampling)
        t0 = time.perf_counter()
        prompts = self._prompts(chats, output_type)
        self.timings = Timings(prompt_s=time.perf_counter() - t0)
        results: list[tuple[np.ndarray | None, str]] = []
        for start in range(0, len(prompts), self.max_batch):
            group = prompts[start : start + self.max_batch]
            prompt, budget, max_steps, cache_len = self._batch(group, max_new_tokens, output_type)
            stream = self._stream_cfg(output_type)
            t1 = time.perf_counter()
            with sharding.use_mesh(self.mesh):
                out = gen.generate(
                    self.params, prompt, budget, jax.random.key(seed), model=self.model,
                    max_steps=max_steps, stream=stream, text_sampling=samp.text,
                    audio_sampling=samp.audio, cache_length=cache_len,
                )  # fmt: skip
                jax.block_until_ready(out.num_steps)
            self.timings.generate_s += time.perf_counter() - t1
            self.timings.steps += int(np.max(out.num_steps[: len(group)]))
            lists = stream_logic.returned_tokens(stream, out.state)[: len(group)]
            for audio, text in lists:
                codes, text_str = self._postprocess(audio, text)
                wav = None
                if output_type == "both" and self.detokenizer is not None and codes.size:
                    t2 = time.perf_counter()
                    wav = self.detokenize_audio(codes, seed)
                    self.timings.detokenize_s += time.perf_counter() - t2
                results.append((wav, text_str))
        return results

    def generate(
        self,
        chats: Messages,
        output_type: str = "text",
        audio_temperature: float = 0.0,
        audio_top_k: int = 5,
        text_temperature: float = 0.0,
        text_top_k: int = 5,
        audio_repetition_penalty: float = 1.0,
        audio_repetition_window_size: int = 64,
        text_repetition_penalty: float = 1.0,
        text_repetition_window_size: int = 16,
        max_new_tokens: int = -1,
        seed: int = 0,
    ) -> tuple[np.ndarray | None, str]:
        """(24 kHz waveform or None, text) for one chat; the official signature and defaults."""
        sampling = dict(
            audio_temperature=audio_temperature, audio_top_k=audio_top_k,
            text_temperature=text_temperature, text_top_k=text_top_k,
            audio_repetition_penalty=audio_repetition_penalty,
            audio_repetition_window_size=audio_repetition_window_size,
            text_repetition_penalty=text_repetition_penalty,
            text_repetition_window_size=text_repetition_window_size,
        )  # fmt: skip
        return self.generate_batch([chats], output_type, max_new_tokens=max_new_tokens, seed=seed,
                                   **sampling)[0]  # fmt: skip

    def generate_stream(
        self,
        chats: Messages,
        output_type: str = "both",
        *,
        max_new_tokens: int = -1,
        seed: int = 0,
        chunk_steps: int = 16,
        **sampling: Any,
    ) -> Iterator[dict[str, Any]]:
        """Yields {"text": new text piece, "audio": new 24 kHz samples or None, "steps": decode
        steps run so far} as they come.

        The decode loop runs `chunk_steps` compiled steps at a time (`generate.resume`); audio
        codes go to the detokenizer's streaming API, which emits a waveform chunk whenever a
        detokenizer chunk is complete. Tokens equal those of `generate` for the same settings.
        """
        samp = Sampling(**sampling)
        (prompt_one,) = self._prompts([chats], output_type)
        prompt, budget, max_steps, cache_len = self._batch(
            [prompt_one], max_new_tokens, output_type
        )
        stream = self._stream_cfg(output_type)
        kw = dict(model=self.model, stream=stream, text_sampling=samp.text,
                  audio_sampling=samp.audio, trace=False)  # fmt: skip
        pending_text: list[str] = []
        steps = [0]  # decode steps run so far (read by the consumer loops below)

        def audio_codes() -> Iterator[np.ndarray]:
            with sharding.use_mesh(self.mesh):
                state = gen.start(self.params, prompt, budget, jax.random.key(seed),
                                  max_steps=max_steps, cache_length=cache_len,
                                  cache=None, **kw)  # fmt: skip
            audio_sent, text_so_far = 0, ""
            while True:
                audio, text = stream_logic.returned_tokens(stream, state.stream)[0]
                decoded = self.detokenize_text(text)
                if len(decoded) > len(text_so_far) and not decoded.endswith("\ufffd"):
                    pending_text.append(decoded[len(text_so_far) :])
                    text_so_far = decoded
                codes = [a - self.kimia_token_offset for a in audio[audio_sent:]
                         if a >= self.kimia_token_offset]  # fmt: skip
                audio_sent = len(audio)
                steps[0] = int(state.stream.step)
                yield np.asarray(codes, np.int64)  # may be empty: lets text pieces flow
                if bool(state.stream.done[0]):
                    break
                until = int(state.stream.step) + chunk_steps
                with sharding.use_mesh(self.mesh):
                    state = gen.resume(self.params, state, jnp.int32(until), **kw)

        def flush() -> str:
            piece = "".join(pending_text)
            pending_text.clear()
            return piece

        if output_type == "both" and self.detokenizer is not None:
            try:
                for wav in self.detokenizer.stream(audio_codes(), key=seed):
                    yield {"text": flush(), "audio": wav, "steps": steps[0]}
            except ValueError as e:  # no audio codes at all (e.g. immediate stop)
                if "empty" not in str(e):
                    raise
        else:
            for codes in audio_codes():
                if pending_text or codes.size:
                    yield {"text": flush(), "audio": None, "steps": steps[0]}
        if pending_text:
            yield {"text": flush(), "audio": None, "steps": steps[0]}

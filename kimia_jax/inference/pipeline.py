"""The stages of one request, as plain functions over typed values (reused by training, evaluation
and serving; `KimiAudio` is a thin facade over them):

    load audio -> tokenize -> build streams -> batch -> generate -> post-process -> detokenize

    clips = collect_audio(chats)                     # every distinct clip of the call, in order
    wavs = load_clips(clips)                         # each file read once
    audio = encode_audio(wavs, clips, glm, whisper)  # ONE batched tokenizer / feature call each
    prompts = build_prompts(builder, chats, output_type, audio)   # text/conversation.Prompt
    batch = plan_batch(prompts, output_type, max_new_tokens, cfg)  # DecodeBatch (PromptBatch)
    rows = run_generate(params, model, batch, stream, sampling, key, mesh)   # token lists
    codes, text = postprocess(rows[i], ...)          # semantic codes + decoded text per row
    wav = detokenizer.detokenize(codes, key=seed)

`StreamingGeneration` is the streaming form: an explicit state object holding the decode state,
the text emitted so far and the detokenizer state (a value returned by `detokenize_chunk`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kimia_jax import sharding
from kimia_jax.audio.io import load_audio
from kimia_jax.configs import LlmConfig, OutputType
from kimia_jax.inference import generate as gen
from kimia_jax.inference import stream_logic
from kimia_jax.inference.sampler import Sampling
from kimia_jax.inference.stream_logic import StreamConfig
from kimia_jax.models.kimia_llm import KimiaLLM
from kimia_jax.text.conversation import (
    AudioInput,
    Prompt,
    PromptBatch,
    PromptBuilder,
    PromptError,
    batch,
)

Messages = Sequence[Mapping[str, Any]]


class Progress(Protocol):
    """`progress(stage, done, total)`: called as a stage ("load", "encode", "decode",
    "detokenize") advances; launchers turn it into progress bars."""

    def __call__(self, stage: str, done: int, total: int) -> None: ...


ClipKey = tuple[str, Any]

# Compiled shapes repeat across requests: prompt lengths and step budgets are rounded up to these.
PROMPT_QUANTUM = 64
STEPS_QUANTUM = 64


def _bucket(n: int, quantum: int) -> int:
    """Rounds up to a multiple of `quantum` so that compiled shapes repeat across requests."""
    return max(quantum, -(-n // quantum) * quantum)


# ----------------------------------------------------------------------------------------------
# 1. load audio


def clip_key(audio: AudioInput) -> ClipKey:
    """Identity of one clip in a call: a file by its path, an array by the object."""
    if isinstance(audio, (str, os.PathLike)):
        return ("path", os.path.abspath(os.fspath(audio)))
    return ("array", id(audio))  # an array or an (array, sample_rate) tuple: the object itself


def _message_audio(m: Any) -> AudioInput | None:
    """The audio content of an "audio" / "audio-text" message (None for anything else; the
    prompt builder reports malformed messages)."""
    if not isinstance(m, Mapping):
        return None
    content = m.get("content")
    if m.get("message_type") == "audio-text" and isinstance(content, (tuple, list)):
        content = content[0] if len(content) == 2 else None
    elif m.get("message_type") != "audio":
        return None
    if isinstance(content, tuple) and len(content) == 2 and isinstance(content[0], np.ndarray):
        return content  # (array, sample_rate)
    return content if isinstance(content, (str, os.PathLike, np.ndarray)) else None


def collect_audio(chats: Sequence[Messages]) -> list[AudioInput]:
    """Every distinct clip of the chats, in order of first appearance; a missing file is an error
    naming the chat and message."""
    seen: dict[ClipKey, AudioInput] = {}
    for c, chat in enumerate(chats):
        if isinstance(chat, (str, bytes, Mapping)) or not isinstance(chat, Sequence):
            continue  # the builder says what is wrong with it
        for i, m in enumerate(chat):
            audio = _message_audio(m)
            if audio is None:
                continue
            try:
                PromptBuilder.check_audio(i, audio)
            except (PromptError, OSError) as e:  # the same error, naming the chat too
                raise type(e)(f"chat {c}, {e}") from None
            seen.setdefault(clip_key(audio), audio)
    return list(seen.values())


def load_clips(clips: Sequence[AudioInput]) -> list[np.ndarray]:
    """16 kHz mono float32 per clip (`audio.io.load_audio`: each file decoded once)."""
    return [load_audio(a) for a in clips]


# ----------------------------------------------------------------------------------------------
# 2. tokenize


@dataclasses.dataclass(frozen=True)
class EncodedAudio:
    """GLM-4 codes (0-based) and, for models with whisper features, `[N, D]` features per clip."""

    codes: Mapping[ClipKey, np.ndarray]
    features: Mapping[ClipKey, np.ndarray] | None

    def codes_of(self, audio: AudioInput) -> np.ndarray:
        return self.codes[clip_key(audio)]

    def features_of(self, audio: AudioInput) -> np.ndarray:
        assert self.features is not None
        return self.features[clip_key(audio)]


def encode_audio(
    wavs: Sequence[np.ndarray],
    clips: Sequence[AudioInput],
    tokenizer: Any,
    whisper: Any | None,
) -> EncodedAudio:
    """One batched `GlmTokenizer.tokenize` call and one `WhisperFeatureExtractor.features` call for
    all clips (their `plan_batches` groups segments of different clips)."""
    keys = [clip_key(a) for a in clips]
    if not wavs:
        return EncodedAudio({}, None if whisper is None else {})
    codes = tokenizer.tokenize(list(wavs))
    feats = None if whisper is None else dict(zip(keys, whisper.features(list(wavs)), strict=True))
    return EncodedAudio(dict(zip(keys, codes, strict=True)), feats)


# ----------------------------------------------------------------------------------------------
# 3. build streams


def build_prompts(
    builder: PromptBuilder,
    chats: Sequence[Messages],
    output_type: OutputType,
    audio: EncodedAudio,
) -> list[Prompt]:
    """One `Prompt` (the two aligned streams + features) per chat, from the encoded clips."""
    if not chats:
        raise PromptError("no chats given")
    b = builder.with_audio(
        audio.codes_of, audio.features_of if builder.whisper_features_fn is not None else None
    )
    return [b.build(chat, output_type) for chat in chats]


# ----------------------------------------------------------------------------------------------
# 4. batch


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """A batch ready for the compiled loop.

    Attributes:
      prompt: right-padded `PromptBatch` (device arrays), rows padded to a power of two (the last
        row repeated) so that compiled shapes repeat.
      budget: [B] int32 step budgets (`stream_logic.budgets`).
      max_steps: static loop bound >= every budget.
      cache_length: KV cache slots (padded prompt + max_steps).
      rows: real rows (the first `rows` of the batch).
    """

    prompt: PromptBatch
    budget: jax.Array
    max_steps: int
    cache_length: int
    rows: int


def plan_batch(
    prompts: Sequence[Prompt], output_type: OutputType, max_new_tokens: int, cfg: LlmConfig
) -> DecodeBatch:
    lengths = [len(p) for p in prompts]
    budget = stream_logic.budgets(output_type, lengths, max_new_tokens)
    if (budget < 1).any():
        limit = stream_logic.BOTH_MAX_TOKENS if output_type == OutputType.BOTH else 7500
        raise PromptError(
            f"prompt of {max(lengths)} positions leaves no generation budget "
            f"({limit} - T for output_type {output_type.value!r})"
        )
    pad_to = _bucket(max(lengths), PROMPT_QUANTUM)
    max_steps = _bucket(int(budget.max()), STEPS_QUANTUM)
    din = cfg.kimia_adaptor_input_dim if cfg.use_whisper_feature else None
    rows = 1 << (len(prompts) - 1).bit_length()
    pb = batch(prompts, pad_to, feature_dim=din).pad_rows(rows)
    gen.check_prompt(cfg, pb, max_steps, None)
    budget = np.concatenate([budget, np.repeat(budget[-1:], rows - len(prompts))])
    return DecodeBatch(
        prompt=jax.tree.map(jnp.asarray, pb),
        budget=jnp.asarray(budget),
        max_steps=max_steps,
        cache_length=pad_to + max_steps,
        rows=len(prompts),
    )


# ----------------------------------------------------------------------------------------------
# 5. generate


@dataclasses.dataclass(frozen=True)
class Generated:
    """Per real row, `(audio_tokens, text_tokens)` as the reference `_generate_loop` returns them;
    `steps`: decode steps of the longest row."""

    tokens: list[tuple[list[int], list[int]]]
    steps: int


def run_generate(
    params: Any,
    model: KimiaLLM,
    batch_: DecodeBatch,
    stream: StreamConfig,
    sampling: Sampling,
    key: jax.Array,
    mesh: Mesh | None,
    progress: Progress | None = None,
    progress_every: int = 32,
) -> Generated:
    """The compiled prefill + decode loop on one batch, under the model's mesh.

    Runs `generate.start` then one `generate.resume` to the end: the same two compiled functions
    that `StreamingGeneration` calls chunk by chunk, so a model that serves both whole and
    streamed requests compiles the loop once (one program per batch shape, not two). With
    `progress`, `resume` runs `progress_every` steps at a time (same program, same tokens) and
    `progress("decode", steps, budget)` is called between the chunks.
    """
    kw = dict(model=model, stream=stream, text_sampling=sampling.text,
              audio_sampling=sampling.audio, trace=False)  # fmt: skip
    with sharding.mesh_context(mesh):
        state = gen.start(
            params, batch_.prompt, batch_.budget, key, max_steps=batch_.max_steps,
            cache_length=batch_.cache_length, cache=None, **kw,
        )  # fmt: skip
        if progress is None:
            state = gen.resume(params, state, jnp.int32(batch_.max_steps), **kw)
        else:  # the same compiled `resume`, `progress_every` steps at a time
            total = int(np.max(np.asarray(batch_.budget)[: batch_.rows]))
            progress("decode", 0, total)
            while not bool(state.stream.all_done) and int(state.stream.step) < batch_.max_steps:
                until = min(int(state.stream.step) + progress_every, batch_.max_steps)
                state = gen.resume(params, state, jnp.int32(until), **kw)
                if not bool(state.stream.all_done):
                    progress("decode", min(int(state.stream.step), total - 1), total)
            progress("decode", total, total)
        steps = int(np.max(np.asarray(state.num_steps)[: batch_.rows]))
    return Generated(stream_logic.returned_tokens(stream, state.stream)[: batch_.rows], steps)


# ----------------------------------------------------------------------------------------------
# 6. post-process (stream_logic.postprocess) and 7. detokenize (Detokenizer.detokenize)


@dataclasses.dataclass(frozen=True)
class TextDecoder:
    """What post-processing needs of the text side: the audio-id offset, the text eos, decode."""

    kimia_token_offset: int
    text_eos: int
    decode: Callable[[list[int]], str]

    def postprocess(self, audio: Sequence[int], text: Sequence[int]) -> tuple[np.ndarray, str]:
        """(semantic codes [n] int64, text) as `KimiAudio.generate` after the loop."""
        return stream_logic.postprocess(
            audio, text, kimia_token_offset=self.kimia_token_offset, text_eos=self.text_eos,
            decode_fn=self.decode,
        )  # fmt: skip

    def text(self, text_ids: Sequence[int]) -> str:
        return stream_logic.detokenize_text(
            [t for t in text_ids if t < self.kimia_token_offset], self.text_eos, self.decode
        )

    def codes(self, audio_ids: Sequence[int]) -> np.ndarray:
        off = self.kimia_token_offset
        return np.asarray([a - off for a in audio_ids if a >= off], np.int64)


# ----------------------------------------------------------------------------------------------
# Streaming


def new_text_piece(decoded: str, sent: str, *, final: bool) -> str:
    """The text to emit now, given the whole text decoded so far and what was already emitted.

    A multi-byte character split across steps decodes to U+FFFD at the end: the piece waits for
    its last byte, unless the generation has ended (`final`), when whatever `generate` returns
    (U+FFFD included) is emitted, so that the pieces always join to `generate`'s text.
    """
    if len(decoded) <= len(sent) or (decoded.endswith("\ufffd") and not final):
        return ""
    return decoded[len(sent) :]


class StreamingGeneration:
    """One chat generated and detokenized piece by piece: an explicit state object.

    Holds the compiled loop's `DecodeState`, how many audio tokens and how much text were already
    emitted, the semantic codes waiting for a complete detokenizer chunk and the
    `DetokenizerState` (the value `detokenize_chunk` returns). `step()` runs `chunk_steps` decode
    steps and returns the event they produced; it is an iterator of the non-empty events until
    the row stopped (prefill ran when it was made).
    Events: {"text": new text piece, "audio": new 24 kHz samples or None, "steps": decode steps
    run so far}. The chunks (and their noise, from `seed`) are those of
    `Detokenizer.detokenize` on the whole utterance, so the streamed audio equals it.
    """

    def __init__(
        self,
        *,
        params: Any,
        model: KimiaLLM,
        batch: DecodeBatch,
        stream: StreamConfig,
        sampling: Sampling,
        text: TextDecoder,
        detokenizer: Any | None,
        seed: int,
        mesh: Mesh | None,
        chunk_steps: int,
        voice_prompt: Any = None,
    ):
        if batch.rows != 1:
            raise ValueError(f"StreamingGeneration streams one chat, got {batch.rows}")
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        self.params, self.model, self.mesh, self.text = params, model, mesh, text
        self.chunk_steps, self.seed = chunk_steps, seed
        self.detokenizer = detokenizer if stream.output_type == OutputType.BOTH else None
        self._kw = dict(model=model, stream=stream, text_sampling=sampling.text,
                        audio_sampling=sampling.audio, trace=False)  # fmt: skip
        self.stream = stream
        with sharding.mesh_context(mesh):
            self.decode = gen.start(
                params, batch.prompt, batch.budget, jax.random.key(seed),
                max_steps=batch.max_steps, cache_length=batch.cache_length, cache=None, **self._kw,
            )  # fmt: skip
        self.audio_sent = 0  # audio tokens of the history already turned into codes
        self.text_sent = ""  # text already emitted
        self.codes = np.zeros((0,), np.int64)  # codes waiting for a complete detokenizer chunk
        self.detok_state = (
            None if self.detokenizer is None else self.detokenizer.new_state(voice_prompt)
        )
        self.finished = False
        self._started = False

    @property
    def steps(self) -> int:
        return int(self.decode.stream.step)

    @property
    def done(self) -> bool:
        return bool(self.decode.stream.done[0])

    def _new_tokens(self) -> tuple[str, np.ndarray]:
        audio, text = stream_logic.returned_tokens(self.stream, self.decode.stream)[0]
        piece = ""
        decoded = self.text.text(text)
        piece = new_text_piece(decoded, self.text_sent, final=self.finished)
        self.text_sent += piece
        codes = self.text.codes(audio[self.audio_sent :])
        self.audio_sent = len(audio)
        return piece, codes

    def _detokenize(self, codes: np.ndarray, final: bool) -> np.ndarray | None:
        pieces, self.detok_state, self.codes = self.detokenizer.detokenize_ready(
            self.detok_state, np.concatenate([self.codes, codes]), final=final, key=self.seed
        )
        return np.concatenate(pieces) if pieces else None

    def step(self) -> dict[str, Any] | None:
        """Runs up to `chunk_steps` decode steps; returns the event, or None if nothing new."""
        if self.finished:
            raise RuntimeError("the generation has finished")
        if self._started:
            until = jnp.int32(self.steps + self.chunk_steps)
            with sharding.mesh_context(self.mesh):
                self.decode = gen.resume(self.params, self.decode, until, **self._kw)
        self._started = True  # the first event reports step 0, which `gen.start` ran
        self.finished = self.done
        piece, codes = self._new_tokens()
        audio = None
        if self.detokenizer is not None:
            audio = self._detokenize(codes, self.finished)
        if not piece and audio is None:
            return None
        return {"text": piece, "audio": audio, "steps": self.steps}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next non-empty event; StopIteration once the row has stopped."""
        while not self.finished:
            event = self.step()
            if event is not None:
                return event
        raise StopIteration

"""Training examples: conversations and pre-training documents as two aligned streams with loss
masks, plus the Whisper windows of their continuous spans (training.md §2.4, §3, §4).

One code path builds the streams of a conversation: `kimia_jax.text.conversation.PromptBuilder`
(the inference prompt builder), called without the trailing assistant start, with its loss flags,
precomputed `audio_tokens` and the speech-output ("audio-text" target) layout. This module adds
what training needs on top of the streams:

* `Example`: the streams of one example, the per-position loss flags of the builder (flag[t] = the
  id AT t is a target), the waveforms of the continuous spans, task name, weight, what was cut.
* `Example.labels`: `x_labels[t] = x_ids[t+1]`, pad id last; `x_loss_mask[t] = flag[t+1]`, False
  last (the official `__getitem__`).
* `SftExampleBuilder`: the official SFT jsonl schema (`task_type`, `conversation`, audio `content`
  as a path relative to the jsonl, `audio_tokens` already offset) and our own records
  (training.md §4.1 schema: `messages` with `kind` text / audio / audio_text, codes not offset),
  and one helper per SFT task (understanding, audio chat, speech conversation, TTS).
* `PretrainExampleBuilder`: the seven pre-training tasks of training.md §3.2 / §3.4 from a run of
  consecutive segments, with the blocks of §3.3 (A, AD, T, T', ADT).
* `Truncation`: the configured maximum length, the policy (truncate / drop / error) and a counter
  of everything that was cut; nothing overflows silently.
* `pack` / `row_arrays` / `stack_rows`: examples -> packed rows of the §2.4 tensors (segment ids,
  restarting positions, `whisper_wav` windows, `cont_src` gather index).

Whisper windows: a clip of L samples is cut into 30 s windows (`audio.io.split_segments`); window w
gives `ceil(L_w / 1280)` feature rows of 4 encoder frames. In a row with W windows the encoder
output is viewed as W * 375 feature rows (375 = 30 s / 80 ms); `cont_src[t]` is the index of
position t's row in that grid (-1 off the continuous positions), i.e. the k-th continuous position
of a clip reads row k of the clip's rows, as the official forward assigns features in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kimia_jax.audio.io import load_audio, split_segments, token_len
from kimia_jax.errors import PromptError
from kimia_jax.text.conversation import PromptBuilder, _Stream, delayed_speech_block
from kimia_jax.text.tokenizer import ExtraTokens, TextTokenizer

WINDOW_SAMPLES = 480000  # 30 s at 16 kHz: one Whisper window
ROWS_PER_WINDOW = 375  # 12.5 Hz feature rows of one full window (4 encoder frames each)
Overflow = Literal["truncate", "drop", "error"]


class ExampleDropped(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the builders when an over-long example is dropped (policy "drop")."""


# ----------------------------------------------------------------------------------------------
# the example


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: two aligned streams and what the loss sees.

    Attributes:
      audio_ids, text_ids: int32 [T].
      is_continuous: bool [T], positions that add a Whisper feature.
      audio_flags, text_flags: bool [T], the builder's per-position loss flags: the id AT t is a
        target of that stream's head (computed at t-1).
      spans: (start, length) of each continuous span, in order; span k reads clip k's features.
      audios: float32 16 kHz waveform per span (only whole 30 s windows that the span uses).
      task: task name (metrics, weights).
      loss_weight: per-task weight, applied to every CE term of this example.
      cut: positions removed by truncation (0 if none).
    """

    audio_ids: np.ndarray
    text_ids: np.ndarray
    is_continuous: np.ndarray
    audio_flags: np.ndarray
    text_flags: np.ndarray
    spans: tuple[tuple[int, int], ...] = ()
    audios: tuple[np.ndarray, ...] = ()
    task: str = ""
    loss_weight: float = 1.0
    cut: int = 0

    def __post_init__(self) -> None:
        n = len(self.audio_ids)
        for name in ("text_ids", "is_continuous", "audio_flags", "text_flags"):
            if len(getattr(self, name)) != n:
                raise AssertionError(f"Example.{name} has {len(getattr(self, name))} != {n} rows")
        if len(self.spans) != len(self.audios):
            raise AssertionError(f"{len(self.spans)} continuous spans but {len(self.audios)} clips")

    def __len__(self) -> int:
        return int(len(self.audio_ids))

    def labels(self, pad_id: int) -> dict[str, np.ndarray]:
        """Shifted targets: x_labels[t] = x_ids[t+1], x_loss_mask[t] = x_flags[t+1]; the last
        position gets `pad_id` and False (official `LazySupervisedDataset.__getitem__`)."""
        out = {}
        for s in ("audio", "text"):
            ids, flags = getattr(self, f"{s}_ids"), getattr(self, f"{s}_flags")
            out[f"{s}_labels"] = np.append(ids[1:], pad_id).astype(np.int32)
            out[f"{s}_loss_mask"] = np.append(flags[1:], False).astype(bool)
        return out

    @property
    def num_windows(self) -> int:
        return sum(-(-len(a) // WINDOW_SAMPLES) for a in self.audios)

    @property
    def num_text_targets(self) -> int:
        return int(self.text_flags[1:].sum())

    @property
    def num_audio_targets(self) -> int:
        return int(self.audio_flags[1:].sum())


def continuous_spans(is_continuous: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every run of True."""
    c = np.asarray(is_continuous, bool).astype(np.int8)
    d = np.diff(np.concatenate([[0], c, [0]]))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _check_clip(span_len: int, wav: np.ndarray, what: str) -> None:
    rows = sum(token_len(len(w)) for w in split_segments(wav))
    if rows != span_len:
        raise PromptError(
            f"{what}: {span_len} audio tokens but the waveform ({len(wav)} samples) gives {rows} "
            "Whisper feature rows (ceil(L/1280) per 30 s window); the tokens were not computed "
            "from this audio (the official forward asserts here)"
        )


# ----------------------------------------------------------------------------------------------
# truncation


@dataclasses.dataclass
class Truncation:
    """Maximum example length, what to do above it, and a counter of what was cut.

    Attributes:
      max_length: positions per example (None: unlimited).
      policy: "truncate" (keep the first max_length positions), "drop" (`ExampleDropped`) or
        "error" (PromptError).
      examples, truncated, dropped, positions_cut, text_targets_cut, audio_targets_cut,
      segments_unused: counters (segments_unused: pre-training segments not used because the next
        block would not fit).
    """

    max_length: int | None = None
    policy: Overflow = "truncate"
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    positions_cut: int = 0
    text_targets_cut: int = 0
    audio_targets_cut: int = 0
    segments_unused: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ("truncate", "drop", "error"):
            raise ValueError(f"Truncation.policy must be truncate/drop/error, got {self.policy!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"Truncation.max_length must be >= 2, got {self.max_length}")

    def summary(self) -> str:
        return (
            f"{self.examples} examples: {self.truncated} truncated ({self.positions_cut} "
            f"positions, {self.text_targets_cut} text and {self.audio_targets_cut} audio targets "
            "cut), "
            f"{self.dropped} dropped, {self.segments_unused} segments unused"
        )

    def apply(self, ex: Example) -> Example:
        """Counts `ex` and fits it to max_length according to the policy."""
        self.examples += 1
        n = len(ex)
        if self.max_length is None or n <= self.max_length:
            return ex
        if self.policy == "error":
            raise PromptError(
                f"example of task {ex.task!r} has {n} positions > max_length {self.max_length} "
                "(use policy 'truncate' or 'drop')"
            )
        if self.policy == "drop":
            self.dropped += 1
            raise ExampleDropped(f"{n} positions > max_length {self.max_length}")
        m = self.max_length
        self.truncated += 1
        self.positions_cut += n - m
        self.text_targets_cut += int(ex.text_flags[m:].sum())
        self.audio_targets_cut += int(ex.audio_flags[m:].sum())
        spans, audios = [], []
        for (s, ln), wav in zip(ex.spans, ex.audios, strict=True):
            keep = min(ln, m - s)
            if keep <= 0:
                continue
            spans.append((s, keep))
            windows = -(-keep // ROWS_PER_WINDOW)  # whole windows: their features stay exact
            audios.append(wav[: windows * WINDOW_SAMPLES])
        return dataclasses.replace(
            ex,
            audio_ids=ex.audio_ids[:m],
            text_ids=ex.text_ids[:m],
            is_continuous=ex.is_continuous[:m],
            audio_flags=ex.audio_flags[:m],
            text_flags=ex.text_flags[:m],
            spans=tuple(spans),
            audios=tuple(audios),
            cut=n - m,
        )


# ----------------------------------------------------------------------------------------------
# SFT


SFT_TASKS = ("asr", "aqa", "aac", "ser", "sec", "asc", "a2t_chat", "s2s", "tts", "understanding")


def _no_tokenizer(audio: Any) -> Any:
    raise PromptError(
        "an audio message has no precomputed 'audio_tokens' and the SftExampleBuilder was built "
        "without audio_tokens_fn (pass GlmTokenizer-based codes, or precompute them with "
        "tools.tokenize_audio / the official extract_semantic_codes)"
    )


class SftExampleBuilder:
    """Conversations -> `Example`s through the shared prompt builder.

    Args:
      tokenizer: the text tokenizer (ids of text and of the special tokens).
      kimia_token_offset: id of audio code 0.
      num_audio_codes: codebook size (range check of codes); None skips the check.
      audio_tokens_fn: audio -> 0-based codes for messages without precomputed tokens.
      truncation: max length / policy / counter (shared across calls).
      audio_loader: path or array -> 16 kHz float32 (default `audio.io.load_audio`, the official
        librosa loader).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        kimia_token_offset: int,
        num_audio_codes: int | None = None,
        audio_tokens_fn: Callable[[Any], Any] | None = None,
        truncation: Truncation | None = None,
        audio_loader: Callable[[Any], np.ndarray] = load_audio,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokenizer.extra_tokens
        self.offset = int(kimia_token_offset)
        self.prompts = PromptBuilder.from_tokenizer(
            tokenizer,
            audio_tokens_fn or _no_tokenizer,
            None,  # features are computed in the train step, from the waveforms
            kimia_token_offset=kimia_token_offset,
            num_audio_codes=num_audio_codes,
            audio_text_layout="target",
        )
        self.truncation = truncation or Truncation()
        self.load = audio_loader

    # -- generic -------------------------------------------------------------------------------

    def conversation(
        self,
        messages: Sequence[Mapping[str, Any]],
        output_type: str = "text",
        *,
        task: str = "sft",
        loss_weight: float = 1.0,
    ) -> Example:
        """Official-format messages (text / audio / audio-text; optional `audio_tokens`, `loss`)."""
        p = self.prompts.build(messages, output_type, add_assistant_start=False)  # type: ignore[arg-type]
        spans = continuous_spans(p.is_continuous)
        clips = [m for m in messages if m["message_type"] == "audio"]
        if len(clips) != len(spans):
            raise AssertionError(f"{len(clips)} audio messages but {len(spans)} continuous spans")
        audios = []
        for k, (m, (_, n)) in enumerate(zip(clips, spans, strict=True)):
            wav = self.load(m["content"])
            _check_clip(n, wav, f"audio message {k} ({_describe(m['content'])})")
            audios.append(wav)
        ex = Example(
            audio_ids=p.audio_ids,
            text_ids=p.text_ids,
            is_continuous=p.is_continuous,
            audio_flags=p.audio_loss_mask,
            text_flags=p.text_loss_mask,
            spans=tuple(spans),
            audios=tuple(audios),
            task=task,
            loss_weight=float(loss_weight),
        )
        return self.truncation.apply(ex)

    def official(
        self, record: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None
    ) -> Example:
        """One line of the official SFT jsonl (`finetune_codes/datasets.py` schema).

        `task_type` "understanding" gives output type "text" (ct after user audio), anything else
        "both" (ctd). Audio `content` paths are resolved against `base_dir` when relative.
        """
        for key in ("task_type", "conversation"):
            if key not in record:
                raise PromptError(
                    f"SFT record lacks {key!r} (official schema: task_type, conversation)"
                )
        output_type = "text" if record["task_type"] == "understanding" else "both"
        msgs = []
        for i, m in enumerate(record["conversation"]):
            m = dict(m)
            if m.get("message_type") == "audio" and isinstance(m.get("content"), str):
                m["content"] = _resolve(m["content"], base_dir)
            elif m.get("message_type") not in ("text", "audio"):
                raise PromptError(
                    f"conversation message {i}: message_type {m.get('message_type')!r} is not in "
                    "the official SFT schema (text, audio)"
                )
            msgs.append(m)
        return self.conversation(msgs, output_type, task=str(record["task_type"]))

    def read_jsonl(self, path: str | os.PathLike[str]) -> Iterable[Example]:
        """Examples of an official SFT jsonl file (paths relative to the file's folder); dropped
        examples are skipped (and counted in `truncation`)."""
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}:{lineno}: invalid JSON ({e})") from e
                try:
                    yield self.official(record, path.parent)
                except ExampleDropped:
                    continue
                except PromptError as e:
                    raise PromptError(f"{path}:{lineno}: {e}") from e

    def record(self, rec: Mapping[str, Any]) -> Example:
        """Our own record (training.md §4.1): {task, output_type, messages: [{role, kind, text,
        text_ids, codes (0-based), audio, loss}]}; `text_ids`, when given, must equal the
        tokenizer's ids of `text` (they pin the tokenizer version)."""
        msgs = []
        for i, m in enumerate(rec["messages"]):
            kind = m.get("kind")
            out: dict[str, Any] = {"role": m.get("role")}
            if "loss" in m:
                out["loss"] = bool(m["loss"])
            if kind in ("text", "audio_text"):
                text = m.get("text")
                if m.get("text_ids") is not None:
                    got = self.tokenizer.encode(text)
                    if list(map(int, m["text_ids"])) != got:
                        raise PromptError(
                            f"message {i}: text_ids differ from the tokenizer's ids of text "
                            "(a different tokenizer version built this record)"
                        )
            if m.get("codes") is not None:
                out["audio_tokens"] = np.asarray(m["codes"], np.int64) + self.offset
            if kind == "text":
                out.update(message_type="text", content=text)
            elif kind == "audio":
                out.update(message_type="audio", content=m.get("audio"))
            elif kind == "audio_text":
                out.update(message_type="audio-text", content=(m.get("audio"), text))
            else:
                raise PromptError(
                    f"message {i}: kind must be text, audio or audio_text, got {kind!r}"
                )
            msgs.append(out)
        return self.conversation(
            msgs,
            rec.get("output_type", "text"),
            task=str(rec.get("task", "sft")),
            loss_weight=float(rec.get("loss_weight", 1.0)),
        )

    # -- one helper per task (training.md §4.3-4.5) ---------------------------------------------

    @staticmethod
    def _audio(audio: Any, codes: Any, offset: int, role: str = "user") -> dict[str, Any]:
        m: dict[str, Any] = {"role": role, "message_type": "audio", "content": audio}
        if codes is not None:
            m["audio_tokens"] = np.asarray(codes, np.int64) + offset
        return m

    def understanding(
        self,
        task: str,
        audio: Any,
        answer: str,
        *,
        instruction: str | None = None,
        instruction_audio: Any = None,
        codes: Any = None,
        instruction_codes: Any = None,
    ) -> Example:
        """ASR / AQA / AAC / SER / SEC / ASC (§4.3): user [text or audio instruction] + audio,
        assistant text answer; output type "text". `codes` are 0-based (None: audio_tokens_fn)."""
        msgs: list[dict[str, Any]] = []
        if instruction is not None:
            msgs.append({"role": "user", "message_type": "text", "content": instruction})
        if instruction_audio is not None:
            msgs.append(self._audio(instruction_audio, instruction_codes, self.offset))
        msgs.append(self._audio(audio, codes, self.offset))
        msgs.append({"role": "assistant", "message_type": "text", "content": answer})
        return self.conversation(msgs, "text", task=task)

    def audio_chat(self, turns: Sequence[tuple[Any, Any, str]]) -> Example:
        """Audio-to-text chat (§4.3): turns of (user audio, its 0-based codes or None, assistant
        text); loss on every assistant turn."""
        msgs: list[dict[str, Any]] = []
        for audio, codes, reply in turns:
            msgs.append(self._audio(audio, codes, self.offset))
            msgs.append({"role": "assistant", "message_type": "text", "content": reply})
        return self.conversation(msgs, "text", task="a2t_chat")

    def speech_chat(self, turns: Sequence[tuple[Any, Any, str, Any]]) -> Example:
        """Speech conversation (§4.4): turns of (user audio, its codes or None, assistant text,
        assistant codes 0-based); the assistant speaks text and audio in parallel, audio delayed by
        6; output type "both"."""
        msgs: list[dict[str, Any]] = []
        for audio, codes, reply, reply_codes in turns:
            msgs.append(self._audio(audio, codes, self.offset))
            msgs.append(
                {
                    "role": "assistant",
                    "message_type": "audio-text",
                    "content": (None, reply),
                    "audio_tokens": np.asarray(reply_codes, np.int64) + self.offset,
                }
            )
        return self.conversation(msgs, "both", task="s2s")

    def tts(self, text: str, codes: Any, *, instruction: str | None = None) -> Example:
        """TTS (§4.5): user text (instruction + text), assistant speech target; output "both"."""
        prompt = text if instruction is None else f"{instruction}{text}"
        msgs = [
            {"role": "user", "message_type": "text", "content": prompt},
            {
                "role": "assistant",
                "message_type": "audio-text",
                "content": (None, text),
                "audio_tokens": np.asarray(codes, np.int64) + self.offset,
            },
        ]
        return self.conversation(msgs, "both", task="tts")


def _resolve(path: str, base_dir: str | os.PathLike[str] | None) -> str:
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return str(p)


def _describe(content: Any) -> str:
    if isinstance(content, np.ndarray):
        return f"waveform of {content.size} samples"
    return str(content)


# ----------------------------------------------------------------------------------------------
# pre-training (training.md §3)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One diarized segment S_i = (a_i, t_i) of a recording.

    codes: 0-based GLM-4 codes [N] (the builder adds kimia_token_offset); text_ids: transcript ids
    (None if untranscribed); audio: 16 kHz float32 waveform (needed only where the segment is a
    continuous input `a_i`).
    """

    codes: np.ndarray
    text_ids: np.ndarray | None = None
    audio: np.ndarray | None = None


# task -> (mixture weight of training.md §3.2 Table 3)
PRETRAIN_TASKS: dict[str, float] = {
    "text_only": 7.0,
    "audio_only": 1.0,
    "asr": 1.0,  # audio -> text mapping
    "tts": 1.0,  # text -> audio mapping
    "audio_to_semantic": 1.0,  # interleaving a_1, ad_2, a_3, ...
    "audio_to_text": 1.0,  # interleaving a_1, t_2, a_3, ...
    "audio_to_semantic_text": 2.0,  # interleaving a_1, ad_2/t_2, a_3, ...
}


class PretrainExampleBuilder:
    """The seven pre-training layouts (training.md §3.3/§3.4 blocks, no role markers).

    Blocks: A(i) `mb, codes (C), me` no loss; AD(i) `mb, codes, me` with audio loss on codes and
    `me`; T(i) `b | t..., b | teos` with text loss; T'(i) = T(i) without loss; ADT(i) the delayed
    parallel block (`delayed_speech_block`, end marker `me` after the codes) with both losses.

    Args:
      tokens: named special ids; kimia_token_offset: id of code 0.
      truncation: max length (segments are added while the next block fits; a first block that
        does not fit alone is truncated by the policy) and counters.
    """

    def __init__(
        self,
        tokens: ExtraTokens,
        *,
        kimia_token_offset: int,
        truncation: Truncation | None = None,
    ) -> None:
        self.t = tokens
        self.offset = int(kimia_token_offset)
        self.truncation = truncation or Truncation()

    # -- blocks: each appends to a _Stream and returns the clip it needs (or None) -------------

    def _a(self, s: _Stream, seg: Segment, what: str) -> np.ndarray:
        if seg.audio is None:
            raise PromptError(
                f"{what}: a continuous-input block (a_i) needs the segment's waveform"
            )
        codes = (np.asarray(seg.codes, np.int64) + self.offset).tolist()
        s.audio_extend([self.t.media_begin])
        s.audio_extend(codes, cont=True)
        s.audio_extend([self.t.media_end])
        s.text_extend([self.t.kimia_text_blank] * (len(codes) + 2))
        _check_clip(len(codes), seg.audio, what)
        return np.asarray(seg.audio, np.float32)

    def _ad(self, s: _Stream, seg: Segment) -> None:
        codes = (np.asarray(seg.codes, np.int64) + self.offset).tolist()
        s.audio_extend([self.t.media_begin])
        s.audio_extend(codes, loss=True)
        s.audio_extend([self.t.media_end], loss=True)
        s.text_extend([self.t.kimia_text_blank] * (len(codes) + 2))

    def _t(self, s: _Stream, seg: Segment, what: str, loss: bool = True) -> None:
        if seg.text_ids is None:
            raise PromptError(f"{what}: a text block needs the segment's transcript ids")
        ids = [int(i) for i in seg.text_ids] + [self.t.kimia_text_eos]
        s.text_extend(ids, loss=loss)
        s.audio_extend([self.t.kimia_text_blank] * len(ids))

    def _adt(self, s: _Stream, seg: Segment, what: str) -> None:
        if seg.text_ids is None:
            raise PromptError(f"{what}: an ADT block needs the segment's transcript ids")
        codes = (np.asarray(seg.codes, np.int64) + self.offset).tolist()
        a, x, la, lt = delayed_speech_block(
            codes, seg.text_ids, self.t, end_id=self.t.media_end, end_at_last=False
        )
        for j in range(len(a)):
            s.audio_extend([a[j]], loss=la[j])
            s.text_extend([x[j]], loss=lt[j])

    # -- tasks ------------------------------------------------------------------------------------

    def text_only(self, text_ids: Sequence[int]) -> Example:
        """Text document: audio stream all blank, text loss on every id (the first has no
        predecessor, so its flag never reaches a mask)."""
        s = _Stream()
        s.text_extend([int(i) for i in text_ids], loss=True)
        s.audio_extend([self.t.kimia_text_blank] * len(text_ids))
        return self._finish(s, [], "text_only", 0)

    def build(self, task: str, segments: Sequence[Segment]) -> Example:
        """One example of `task` from consecutive segments (in order), as many as fit."""
        if task == "text_only":
            raise PromptError("text_only takes a token list: use text_only(text_ids)")
        if task not in PRETRAIN_TASKS:
            raise PromptError(f"unknown pre-training task {task!r}; one of {list(PRETRAIN_TASKS)}")
        if not segments:
            raise PromptError(f"{task}: no segments")
        s = _Stream()
        audios: list[np.ndarray] = []
        used = 0
        for i, seg in enumerate(segments):
            trial = _Stream()
            clip = self._block(task, i, seg, trial)
            limit = self.truncation.max_length
            if used and limit is not None and len(s.audio) + len(trial.audio) > limit:
                break
            _append(s, trial)
            if clip is not None:
                audios.append(clip)
            used += 1
        self.truncation.segments_unused += len(segments) - used
        return self._finish(s, audios, task, used)

    def _block(self, task: str, i: int, seg: Segment, s: _Stream) -> np.ndarray | None:
        """Appends segment i's block(s) of `task`; returns its clip if it is a continuous input."""
        what = f"{task} segment {i}"
        odd = i % 2 == 0  # segments 1, 3, 5, ... (1-based) are the continuous inputs a_i
        if task == "audio_only":
            self._ad(s, seg)
        elif task == "asr":
            clip = self._a(s, seg, what)
            self._t(s, seg, what)
            return clip
        elif task == "tts":
            self._t(s, seg, what, loss=False)
            self._ad(s, seg)
        elif odd:
            return self._a(s, seg, what)
        elif task == "audio_to_semantic":
            self._ad(s, seg)
        elif task == "audio_to_text":
            self._t(s, seg, what)
        else:  # audio_to_semantic_text
            self._adt(s, seg, what)
        return None

    def _finish(self, s: _Stream, audios: list[np.ndarray], task: str, used: int) -> Example:
        del used
        cont = np.asarray(s.cont, bool)
        ex = Example(
            audio_ids=np.asarray(s.audio, np.int32),
            text_ids=np.asarray(s.text, np.int32),
            is_continuous=cont,
            audio_flags=np.asarray(s.audio_loss, bool),
            text_flags=np.asarray(s.text_loss, bool),
            spans=tuple(continuous_spans(cont)),
            audios=tuple(audios),
            task=task,
        )
        return self.truncation.apply(ex)


def _append(dst: _Stream, src: _Stream) -> None:
    dst.audio += src.audio
    dst.text += src.text
    dst.cont += src.cont
    dst.audio_loss += src.audio_loss
    dst.text_loss += src.text_loss


# ----------------------------------------------------------------------------------------------
# rows: packing and the §2.4 tensors


def pack(
    examples: Sequence[Example], length: int, max_windows: int, max_segments: int
) -> list[list[int]]:
    """First-fit packing: indices of the examples of each row, in order within a row.

    A row holds at most `length` positions, `max_windows` Whisper windows and `max_segments`
    examples. An example that cannot fit an empty row is an error (truncate it first).
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []
    for i, ex in enumerate(examples):
        if len(ex) > length or ex.num_windows > max_windows:
            raise PromptError(
                f"example {i} ({ex.task}) needs {len(ex)} positions / {ex.num_windows} windows, "
                f"more than a row ({length} / {max_windows}); set Truncation.max_length"
            )
        for r, (pos, win) in enumerate(room):
            if pos >= len(ex) and win >= ex.num_windows and len(rows[r]) < max_segments:
                rows[r].append(i)
                room[r] = (pos - len(ex), win - ex.num_windows)
                break
        else:
            rows.append([i])
            room.append((length - len(ex), max_windows - ex.num_windows))
    return rows


def row_arrays(
    examples: Sequence[Example],
    length: int,
    max_windows: int,
    pad_id: int,
    *,
    wav_dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """The §2.4 tensors of one row holding `examples` back to back (segment ids 1, 2, ...).

    Returns: audio_ids, text_ids, audio_labels, text_labels, positions (restarting at 0 per
    example; padding continues the row index), segment_ids, cont_src (int32 [T]); is_continuous,
    audio_loss_mask, text_loss_mask (bool [T]); loss_weight (float32 [T]); whisper_wav
    ([W, 480000], float32 or int16 = round(x * 32768)); whisper_keep (int32 [W],
    4 * ceil(L_w / 1280) frames, 0 for unused windows).
    """
    t, w = length, max_windows
    out = {
        "audio_ids": np.full(t, pad_id, np.int32),
        "text_ids": np.full(t, pad_id, np.int32),
        "audio_labels": np.full(t, pad_id, np.int32),
        "text_labels": np.full(t, pad_id, np.int32),
        "positions": np.zeros(t, np.int32),
        "segment_ids": np.zeros(t, np.int32),
        "cont_src": np.full(t, -1, np.int32),
        "is_continuous": np.zeros(t, bool),
        "audio_loss_mask": np.zeros(t, bool),
        "text_loss_mask": np.zeros(t, bool),
        "loss_weight": np.zeros(t, np.float32),
        "whisper_wav": np.zeros((w, WINDOW_SAMPLES), wav_dtype),
        "whisper_keep": np.zeros(w, np.int32),
    }
    pos = win = 0
    for k, ex in enumerate(examples, start=1):
        n = len(ex)
        if pos + n > t:
            raise PromptError(f"row overflow: {pos + n} positions > {t}")
        sl = slice(pos, pos + n)
        out["audio_ids"][sl] = ex.audio_ids
        out["text_ids"][sl] = ex.text_ids
        out["is_continuous"][sl] = ex.is_continuous
        for key, v in ex.labels(pad_id).items():
            out[key][sl] = v
        out["positions"][sl] = np.arange(n)
        out["segment_ids"][sl] = k
        out["loss_weight"][sl] = ex.loss_weight
        for (start, span_len), wav in zip(ex.spans, ex.audios, strict=True):
            windows = split_segments(np.asarray(wav, np.float32))
            if win + len(windows) > w:
                raise PromptError(f"row needs more than max_windows={w} Whisper windows")
            for j, seg in enumerate(windows):
                if np.dtype(wav_dtype) == np.int16:
                    out["whisper_wav"][win + j, : len(seg)] = np.round(seg * 32768.0).clip(
                        -32768, 32767
                    )
                else:
                    out["whisper_wav"][win + j, : len(seg)] = seg
                out["whisper_keep"][win + j] = 4 * token_len(len(seg))
            r = np.arange(span_len)
            out["cont_src"][pos + start : pos + start + span_len] = (
                win + r // ROWS_PER_WINDOW
            ) * ROWS_PER_WINDOW + r % ROWS_PER_WINDOW
            win += len(windows)
        pos += n
    # Padding continues the row index: under a positions-based causal mask no real query
    # (positions < its example's length) can see a padding key.
    out["positions"][pos:] = np.arange(pos, t)
    return out


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[B, ...] batch of row dicts."""
    if not rows:
        raise ValueError("stack_rows: no rows")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batch_of(
    examples: Sequence[Example],
    length: int,
    max_windows: int,
    pad_id: int,
    *,
    packed: bool = True,
    max_segments: int = 8,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Examples -> one [B, T] batch (packed first-fit, or one example per row); `rows` pads the
    batch with empty rows (all masks False) to a fixed B."""
    groups = (
        pack(examples, length, max_windows, max_segments)
        if packed
        else [[i] for i in range(len(examples))]
    )
    arrays = [row_arrays([examples[i] for i in g], length, max_windows, pad_id) for g in groups]
    if rows is not None:
        if len(arrays) > rows:
            raise PromptError(f"{len(arrays)} rows needed, batch has {rows}")
        arrays += [row_arrays([], length, max_windows, pad_id)] * (rows - len(arrays))
    return stack_rows(arrays)

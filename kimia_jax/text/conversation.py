"""Dual-stream prompt builder: twin of `KimiAPromptManager.get_prompt` (llm.md §5, training.md §4).

Messages use the official format: a list of dicts
`{"role": "user"|"assistant", "message_type": "text"|"audio"|"audio-text", "content": ...}`;
text content is a str, audio content a file path, a waveform array (16 kHz; `[L]`, `[C, L]` or
`[L, C]`, float or integer PCM) or an `(array, sample_rate)` tuple, and
"audio-text" content a pair `(audio, text)` (an assistant speech turn given with its transcript).

Two builder versions (argument `version`):
* `"349251e"` (default): MoonshotAI/Kimi-Audio after PR #100 (commit 349251e). An assistant
  *text* message ends with `blank | text_eos`; `"audio-text"` messages exist (audio stream =
  6 blanks + codes, not continuous, no media markers; text stream = the transcript padded with
  blanks to the same length); loss masks are produced.
* `"2607d51"`: the builder at commit 2607d51 (what the LLM fixture was built with): no text_eos in
  assistant text history, no "audio-text".
Single-turn prompts (ASR, QA, speech chat) are identical in both.

The audio tokenizer and the Whisper feature extractor are injected callables, so this module does
not depend on the audio package:
* `audio_tokens_fn(audio) -> int array [N]`: GLM-4 codes (0-based; the builder adds
  `kimia_token_offset`);
* `whisper_features_fn(audio) -> float array [N', D]` (D = 5120 for the 7B: four 1280-d Whisper
  frames per 12.5 Hz step); N' >= N is required, extra frames are dropped as in the LLM forward.
Both receive the message's audio content unchanged (path or waveform).

Training additions (defaults keep every inference prompt unchanged):
* a message may carry `"audio_tokens"`: precomputed ids already shifted by `kimia_token_offset`,
  as the official `extract_semantic_codes` writes them; `audio_tokens_fn` is then not called;
* a message may carry `"loss": False` to switch the loss flags of an assistant message off;
* `audio_text_layout="target"`: an assistant "audio-text" message is laid out as a speech-output
  target (training.md §4.4, `delayed_speech_block`): text ids + `text_eos` with text loss, audio 6
  blanks + codes + the turn's `msg_end` with audio loss.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import OutputType
from kimia_jax.errors import PromptError  # noqa: F401 (re-export)
from kimia_jax.text.tokenizer import ExtraTokens, TextTokenizer

AudioInput = str | os.PathLike[str] | np.ndarray | tuple
BuilderVersion = Literal["349251e", "2607d51"]
AudioTextLayout = Literal["official", "target"]

ROLES = ("user", "assistant")
VERSIONS = ("349251e", "2607d51")
MESSAGE_TYPES = {"349251e": ("text", "audio", "audio-text"), "2607d51": ("text", "audio")}
# `kimia_text_audiodelaytokens` (hard-coded 6 in kimia.py; the config key is unused): the audio
# stream lags the text stream by this many positions, in "audio-text" prompts and in generation.
AUDIO_DELAY = 6


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: two aligned token streams plus continuous features.

    Attributes:
        audio_ids: [T] int32, audio stream (`input_ids` of the official forward).
        text_ids: [T] int32, text stream (`text_input_ids`).
        is_continuous: [T] bool, positions whose embedding mixes a Whisper feature row.
        features: one float32 array [N_k, D] per audio message, in order, each already
            truncated to the N_k continuous positions of its segment.
        audio_loss_mask, text_loss_mask: [T] bool, the newer builder's loss masks (all False
            for version 2607d51, which has none).
    """

    audio_ids: np.ndarray
    text_ids: np.ndarray
    is_continuous: np.ndarray
    features: tuple[np.ndarray, ...]
    audio_loss_mask: np.ndarray
    text_loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.audio_ids.shape[0])

    @property
    def feature_dim(self) -> int | None:
        return int(self.features[0].shape[1]) if self.features else None

    def dense_features(self, feature_dim: int | None = None) -> np.ndarray:
        """Features scattered onto their positions: [T, D] float32, zero rows elsewhere.

        This is what the official forward builds before the adaptor (`X[b_k+1:e_k] = F_k`).
        """
        d = self.feature_dim if feature_dim is None else feature_dim
        if d is None:
            raise ValueError("prompt has no features; pass feature_dim")
        out = np.zeros((len(self), d), np.float32)
        if self.features:
            if self.feature_dim != d:
                raise ValueError(f"feature_dim {d} != the prompt's features' {self.feature_dim}")
            out[self.is_continuous] = np.concatenate(self.features, axis=0)
        return out


@flax.struct.dataclass
class PromptBatch:
    """Prompts padded to one length P: the batch that prefill and the compiled loop take.

    The same field names as `Prompt` (one conversation's streams); a pytree, so it goes into
    `jax.jit` as it is (host numpy or device arrays).

    Attributes:
        audio_ids, text_ids: [B, P] int32, padded with `pad_id`.
        is_continuous: [B, P] bool (False on padding).
        features: [B, P, D] float32 dense features (zero rows off the continuous positions), or
            None when no prompt has audio and no feature_dim was given.
        lengths: [B] int32 number of real tokens per row (>= 1).
        padding: "right" (tokens at [0, len)) or "left" (tokens at [P - len, P)); static.
    """

    audio_ids: Any
    text_ids: Any
    is_continuous: Any
    features: Any
    lengths: Any
    padding: str = flax.struct.field(pytree_node=False, default="right")

    def _xp(self) -> Any:
        return np if isinstance(self.lengths, np.ndarray) else jnp

    @property
    def valid(self) -> Any:
        """[B, P] bool, True on real tokens."""
        xp, p = self._xp(), self.audio_ids.shape[1]
        col = xp.arange(p)[None, :]
        n = self.lengths[:, None]
        return col < n if self.padding == "right" else col >= p - n

    @property
    def positions(self) -> Any:
        """[B, P] int32 RoPE positions: 0..len-1 on the real tokens, 0 on padding."""
        xp, p = self._xp(), self.audio_ids.shape[1]
        col = xp.arange(p, dtype=xp.int32)[None, :]
        pos = col if self.padding == "right" else col - (p - self.lengths[:, None])
        return xp.where(self.valid, pos, 0).astype(xp.int32)

    def pad_rows(self, rows: int) -> PromptBatch:
        """The batch with its last row repeated up to `rows` rows (fixed compiled shapes)."""
        extra = rows - self.lengths.shape[0]
        if extra < 0:
            raise ValueError(f"pad_rows: {rows} rows < the batch's {self.lengths.shape[0]}")

        def pad(x: Any) -> Any:
            if x is None or not extra:
                return x
            xp = np if isinstance(x, np.ndarray) else jnp
            return xp.concatenate([x, xp.repeat(x[-1:], extra, 0)])

        return jax.tree.map(pad, self)


def batch(
    prompts: Sequence[Prompt],
    pad_to: int | None = None,
    *,
    padding: Literal["right", "left"] = "right",
    pad_id: int = 0,
    feature_dim: int | None = None,
) -> PromptBatch:
    """Pads prompts into [B, P] arrays plus per-row lengths.

    Convention for the decode loop: right padding. Row b holds its prompt at positions
    [0, lengths[b]) with RoPE positions 0..lengths[b]-1; prefill writes P cache slots per row, the
    logits of row b's last prompt token are at index lengths[b]-1, and the k-th generated token of
    row b gets RoPE position lengths[b] + k and cache slot lengths[b] + k (so the padding slots
    [lengths[b], P) are overwritten by generated tokens before they could be attended to; they
    must be masked until then). Left padding puts every last prompt token at P-1 instead.
    Padding slots carry `pad_id` in both streams, False masks and zero features.

    Args:
        prompts: built prompts.
        pad_to: padded length P (default: the longest prompt). Must be >= every length.
        padding: "right" (default) or "left".
        pad_id: id written on padding positions (any valid id; it is masked out).
        feature_dim: feature width D, needed only when no prompt has audio.

    Returns:
        A PromptBatch.
    """
    if not prompts:
        raise ValueError("batch: no prompts")
    if padding not in ("right", "left"):
        raise ValueError(f"batch: padding must be 'right' or 'left', got {padding!r}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max()) if pad_to is None else int(pad_to)
    if width < lengths.max():
        raise ValueError(
            f"batch: pad_to={pad_to} is shorter than the longest prompt ({lengths.max()})"
        )
    dims = {p.feature_dim for p in prompts if p.feature_dim is not None}
    if feature_dim is not None:
        dims.add(feature_dim)
    if len(dims) > 1:
        raise ValueError(f"batch: prompts have different feature widths {sorted(dims)}")
    d = dims.pop() if dims else None
    b = len(prompts)
    audio = np.full((b, width), pad_id, np.int32)
    text = np.full((b, width), pad_id, np.int32)
    cont = np.zeros((b, width), bool)
    feats = None if d is None else np.zeros((b, width, d), np.float32)
    for i, p in enumerate(prompts):
        n = len(p)
        sl = slice(0, n) if padding == "right" else slice(width - n, width)
        audio[i, sl] = p.audio_ids
        text[i, sl] = p.text_ids
        cont[i, sl] = p.is_continuous
        if feats is not None:
            feats[i, sl] = p.dense_features(d)
    return PromptBatch(audio, text, cont, feats, lengths, padding=padding)


def delayed_speech_block(
    codes: Sequence[int],
    text_ids: Sequence[int],
    tokens: ExtraTokens,
    *,
    end_id: int,
    end_at_last: bool,
    delay: int = AUDIO_DELAY,
) -> tuple[list[int], list[int], list[bool], list[bool]]:
    """Audio and text of one speech-output span in parallel (training.md §3.3 ADT, §4.4).

    Text stream: the text ids, `text_eos`, then blanks. Audio stream: `delay` blanks, the codes
    (already offset), the end marker `end_id`, blanks where the text is longer. Length
    L = max(n + 1, N + delay + 1). The end marker sits right after the codes, or on the last row
    when `end_at_last` (an SFT turn's `msg_end`, which must close the turn). Loss flags: text ids
    and `text_eos` (text), codes and the end marker (audio); blanks have none.

    Returns:
      (audio ids, text ids, audio loss flags, text loss flags), each of length L.
    """
    n, m = len(text_ids), len(codes)
    length = max(n + 1, m + delay + 1)
    end = length - 1 if end_at_last else m + delay
    audio = [tokens.kimia_text_blank] * length
    audio[delay : delay + m] = [int(c) for c in codes]
    audio[end] = end_id
    a_loss = [False] * length
    for j in range(delay, delay + m):
        a_loss[j] = True
    a_loss[end] = True
    text = [int(i) for i in text_ids] + [tokens.kimia_text_eos]
    text += [tokens.kimia_text_blank] * (length - len(text))
    t_loss = [True] * (n + 1) + [False] * (length - n - 1)
    return audio, text, a_loss, t_loss


class _Stream:
    """Accumulates the parallel lists of `KimiAContent` (kimia_infer/utils/data.py)."""

    def __init__(self) -> None:
        self.audio: list[int] = []
        self.text: list[int] = []
        self.cont: list[bool] = []
        self.audio_loss: list[bool] = []
        self.text_loss: list[bool] = []
        self.features: list[np.ndarray] = []

    def audio_extend(self, ids: Sequence[int], *, cont: bool = False, loss: bool = False) -> None:
        self.audio.extend(int(i) for i in ids)
        self.cont.extend([cont] * len(ids))
        self.audio_loss.extend([loss] * len(ids))

    def text_extend(self, ids: Sequence[int], *, loss: bool = False) -> None:
        self.text.extend(int(i) for i in ids)
        self.text_loss.extend([loss] * len(ids))

    def pair(self, audio_id: int, text_id: int) -> None:
        self.audio_extend([audio_id])
        self.text_extend([text_id])


class PromptBuilder:
    """Builds `Prompt`s from official-format messages.

    Args:
        extra_tokens: named special ids (from `TextTokenizer.extra_tokens`).
        text_encode_fn: str -> list of text ids (`TextTokenizer.encode`: no bos/eos).
        audio_tokens_fn: audio -> GLM-4 codes [N] (0-based).
        whisper_features_fn: audio -> [N', D] continuous features, or None for a model without
            `use_whisper_feature` (then no features are attached).
        kimia_token_offset: id of audio code 0 (config `kimia_token_offset`).
        num_audio_codes: codebook size (16384 for the 7B), to reject out-of-range codes; None
            skips the check.
        version: "349251e" (default, post PR #100) or "2607d51" (see module docstring).
        audio_text_layout: "official" (default: the released history form of an assistant
            "audio-text" message) or "target" (the training layout, module docstring).
    """

    def __init__(
        self,
        extra_tokens: ExtraTokens,
        text_encode_fn: Callable[[str], Sequence[int]],
        audio_tokens_fn: Callable[[AudioInput], Any],
        whisper_features_fn: Callable[[AudioInput], Any] | None,
        *,
        kimia_token_offset: int,
        num_audio_codes: int | None = None,
        version: BuilderVersion = "349251e",
        audio_text_layout: AudioTextLayout = "official",
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if audio_text_layout not in ("official", "target"):
            raise ValueError(
                f"audio_text_layout must be 'official' or 'target', got {audio_text_layout!r}"
            )
        self.audio_text_layout = audio_text_layout
        self.tokens = extra_tokens
        self.text_encode_fn = text_encode_fn
        self.audio_tokens_fn = audio_tokens_fn
        self.whisper_features_fn = whisper_features_fn
        self.kimia_token_offset = int(kimia_token_offset)
        self.num_audio_codes = num_audio_codes
        self.version = version

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: TextTokenizer,
        audio_tokens_fn: Callable[[AudioInput], Any],
        whisper_features_fn: Callable[[AudioInput], Any] | None,
        *,
        kimia_token_offset: int,
        num_audio_codes: int | None = None,
        version: BuilderVersion = "349251e",
        audio_text_layout: AudioTextLayout = "official",
    ) -> PromptBuilder:
        """Builder using `tokenizer.encode` and `tokenizer.extra_tokens` (the official wiring)."""
        if tokenizer.vocab_size > kimia_token_offset:
            raise ValueError(
                f"text vocabulary ({tokenizer.vocab_size}) overlaps the audio ids starting at "
                f"kimia_token_offset={kimia_token_offset}"
            )
        return cls(
            tokenizer.extra_tokens,
            tokenizer.encode,
            audio_tokens_fn,
            whisper_features_fn,
            kimia_token_offset=kimia_token_offset,
            num_audio_codes=num_audio_codes,
            version=version,
            audio_text_layout=audio_text_layout,
        )

    def with_audio(
        self,
        audio_tokens_fn: Callable[[AudioInput], Any],
        whisper_features_fn: Callable[[AudioInput], Any] | None,
    ) -> PromptBuilder:
        """The same builder reading audio codes / features from other functions (e.g. a table of
        clips encoded in one batched call)."""
        b = copy.copy(self)
        b.audio_tokens_fn, b.whisper_features_fn = audio_tokens_fn, whisper_features_fn
        return b

    # -- validation helpers ------------------------------------------------------------------

    def _check_message(self, i: int, m: Any) -> None:
        if not isinstance(m, Mapping):
            raise PromptError(f"message {i}: expected a dict, got {type(m).__name__}")
        missing = [k for k in ("role", "message_type", "content") if k not in m]
        if missing:
            raise PromptError(f"message {i}: missing key(s) {missing}")
        if m["role"] not in ROLES:
            raise PromptError(f"message {i}: unknown role {m['role']!r} (expected one of {ROLES})")
        types = MESSAGE_TYPES[self.version]
        if m["message_type"] not in types:
            raise PromptError(
                f"message {i}: unknown message_type {m['message_type']!r} (builder version "
                f"{self.version} accepts {types})"
            )

    @staticmethod
    def _check_text(i: int, content: Any) -> str:
        if not isinstance(content, str):
            raise PromptError(
                f"message {i}: text content must be a str, got {type(content).__name__}"
                + (
                    " (audio belongs in an 'audio' message)"
                    if isinstance(content, np.ndarray)
                    else ""
                )
            )
        return content

    @staticmethod
    def check_audio(i: int, content: Any) -> AudioInput:
        """Structural check of an audio content (decoding is the audio loader's): a file path, a
        waveform array or an `(array, sample_rate)` tuple, in any layout the loader takes."""
        if isinstance(content, (str, os.PathLike)):
            path = Path(content)
            if path.is_dir():
                raise IsADirectoryError(
                    f"message {i}: audio path {os.fspath(content)} is a folder, not an audio file"
                )
            if not path.is_file():
                raise FileNotFoundError(f"message {i}: audio file not found: {os.fspath(content)}")
            return content
        wav, rate = content, None
        if isinstance(content, tuple):
            if len(content) != 2:
                raise PromptError(
                    f"message {i}: an audio tuple must be (array, sample_rate), got "
                    f"{len(content)} items"
                )
            wav, rate = content
            if (isinstance(rate, bool) or not isinstance(rate, (int, np.integer, float))
                    or not rate > 0 or rate != int(rate)):  # fmt: skip
                raise PromptError(
                    f"message {i}: the sample rate of an (array, sample_rate) tuple must be a "
                    f"positive integer in Hz, got {rate!r}"
                )
        if isinstance(wav, np.ndarray):
            if wav.ndim not in (1, 2) or wav.size == 0:
                raise PromptError(
                    f"message {i}: audio waveform must be a non-empty [samples], [channels, "
                    f"samples] or [samples, channels] array, got shape {wav.shape}"
                )
            kind = wav.dtype
            if kind == np.bool_ or not (
                np.issubdtype(kind, np.floating) or np.issubdtype(kind, np.integer)
            ):
                raise PromptError(
                    f"message {i}: audio waveform must be float or integer PCM, got {kind}"
                )
            return content
        raise PromptError(
            f"message {i}: audio content must be a file path, a waveform array or an "
            f"(array, sample_rate) tuple, got {type(content).__name__}"
        )

    def _codes(self, i: int, audio: AudioInput, precomputed: Any = None) -> list[int]:
        if precomputed is not None:  # official schema: ids already shifted by the offset
            ids = np.asarray(precomputed)
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise PromptError(
                    f"message {i}: audio_tokens must be a non-empty list of ints, got "
                    f"{ids.dtype} {ids.shape}"
                )
            lo = self.kimia_token_offset
            hi = None if self.num_audio_codes is None else lo + self.num_audio_codes
            if ids.min() < lo or (hi is not None and ids.max() >= hi):
                raise PromptError(
                    f"message {i}: audio_tokens outside [{lo}, {hi}) (they must already include "
                    f"kimia_token_offset, as extract_semantic_codes writes them): min {ids.min()}, "
                    f"max {ids.max()}"
                )
            return ids.astype(np.int64).tolist()
        codes = np.asarray(self.audio_tokens_fn(audio))
        codes = codes.reshape(-1) if codes.ndim == 2 and codes.shape[0] == 1 else codes
        if codes.ndim != 1 or codes.size == 0 or not np.issubdtype(codes.dtype, np.integer):
            raise PromptError(
                f"message {i}: audio_tokens_fn must return a non-empty 1-D integer array, got "
                f"{codes.dtype} {codes.shape}"
            )
        hi = self.num_audio_codes
        if codes.min() < 0 or (hi is not None and codes.max() >= hi):
            raise PromptError(
                f"message {i}: audio codes outside [0, {hi}): min {codes.min()}, max {codes.max()}"
            )
        return (codes.astype(np.int64) + self.kimia_token_offset).tolist()

    def _features(self, i: int, audio: AudioInput, n: int) -> np.ndarray:
        f = np.asarray(self.whisper_features_fn(audio), np.float32)
        f = f[0] if f.ndim == 3 and f.shape[0] == 1 else f
        if f.ndim != 2:
            raise PromptError(f"message {i}: whisper_features_fn must return [N, D], got {f.shape}")
        if f.shape[0] < n:
            raise PromptError(
                f"message {i}: {f.shape[0]} whisper feature frames for {n} audio tokens (need >= "
                f"{n}; the official forward would fail the same way)"
            )
        return f[:n]

    # -- building ----------------------------------------------------------------------------

    def _message(
        self,
        i: int,
        m: Mapping[str, Any],
        s: _Stream,
        *,
        role_marker: bool,
        turn_end: bool,
        output_type: OutputType,
    ) -> None:
        """`tokenize_message` of the reference; `turn_end` = has_ct_token = has_msg_end_token."""
        t = self.tokens
        role = m["role"]
        new = self.version == "349251e"
        has_loss = new and role == "assistant" and bool(m.get("loss", True))
        if role_marker:
            start = t.kimia_user_msg_start if role == "user" else t.kimia_assistant_msg_start
            s.pair(start, t.kimia_text_blank)
        kind = m["message_type"]
        if kind == "text":
            ids = list(self.text_encode_fn(self._check_text(i, m["content"])))
            s.text_extend(ids, loss=has_loss)
            s.audio_extend([t.kimia_text_blank] * len(ids))
            if new and role == "assistant":  # PR #100: text stream eos closes assistant text
                s.text_extend([t.kimia_text_eos], loss=has_loss)
                s.audio_extend([t.kimia_text_blank])
        elif kind == "audio":
            audio = self.check_audio(i, m["content"])
            codes = self._codes(i, audio, m.get("audio_tokens"))
            s.audio_extend([t.media_begin])
            s.audio_extend(codes, cont=True, loss=has_loss)
            s.audio_extend([t.media_end], loss=has_loss)
            s.text_extend([t.kimia_text_blank] * (len(codes) + 2))
            if turn_end:
                s.pair(
                    t.kimia_speech_ct_id
                    if output_type == OutputType.TEXT
                    else t.kimia_speech_ctd_id,
                    t.kimia_text_blank,
                )
            if self.whisper_features_fn is not None:
                s.features.append(self._features(i, audio, len(codes)))
        else:  # "audio-text" (349251e only): no loss, no features, no media markers
            content = m["content"]
            if not isinstance(content, (tuple, list)) or len(content) != 2:
                raise PromptError(f"message {i}: 'audio-text' content must be a pair (audio, text)")
            # with precomputed tokens the waveform is not needed (no features on this span)
            pre = m.get("audio_tokens")
            audio = content[0] if pre is not None else self.check_audio(i, content[0])
            text = self._check_text(i, content[1])
            codes = self._codes(i, audio, pre)
            ids = list(self.text_encode_fn(text))
            if self.audio_text_layout == "target" and role == "assistant":
                if not turn_end:
                    raise PromptError(
                        f"message {i}: a target 'audio-text' message must end its turn (its "
                        "msg_end is the audio end marker)"
                    )
                a, x, la, lt = delayed_speech_block(
                    codes, ids, t, end_id=t.msg_end, end_at_last=True
                )
                for j in range(len(a)):
                    s.audio_extend([a[j]], loss=has_loss and la[j])
                    s.text_extend([x[j]], loss=has_loss and lt[j])
                return
            n_pad = AUDIO_DELAY + len(codes) - len(ids)
            if n_pad < 0:
                raise PromptError(
                    f"message {i}: 'audio-text' transcript has {len(ids)} tokens, more than "
                    f"{AUDIO_DELAY} + {len(codes)} audio tokens (the official builder fails here)"
                )
            s.audio_extend([t.kimia_text_blank] * AUDIO_DELAY)
            s.audio_extend(codes)
            s.text_extend(ids)
            s.text_extend([t.kimia_text_blank] * n_pad)
        if turn_end:
            s.pair(t.msg_end, t.kimia_text_blank)

    def build(
        self,
        messages: Sequence[Mapping[str, Any]],
        output_type: OutputType | str = OutputType.TEXT,
        *,
        add_assistant_start: bool = True,
    ) -> Prompt:
        """`get_prompt(messages, output_type)`: the prompt that generation continues.

        Args:
            messages: official-format messages (module docstring).
            output_type: "text" (ct marker after a user audio turn) or "both" (ctd marker).
            add_assistant_start: append the `kimia_assistant_msg_start | blank` position that
                generation starts after (always done by the official inference builder).
        """
        output_type = OutputType.parse(output_type)  # a public stage: its own edge
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise PromptError(f"messages must be a list of dicts, got {type(messages).__name__}")
        if not messages:
            raise PromptError("messages is empty")
        for i, m in enumerate(messages):
            self._check_message(i, m)
        s = _Stream()
        for i, m in enumerate(messages):
            role_marker = i == 0 or m["role"] != messages[i - 1]["role"]
            turn_end = i == len(messages) - 1 or messages[i + 1]["role"] != m["role"]
            self._message(
                i, m, s, role_marker=role_marker, turn_end=turn_end, output_type=output_type
            )
        if add_assistant_start:
            s.pair(self.tokens.kimia_assistant_msg_start, self.tokens.kimia_text_blank)
        n = len(s.audio)
        if not n == len(s.text) == len(s.cont):  # guards the reference's is_valid() invariant
            raise AssertionError(f"stream lengths differ: {n}, {len(s.text)}, {len(s.cont)}")
        return Prompt(
            audio_ids=np.asarray(s.audio, np.int32),
            text_ids=np.asarray(s.text, np.int32),
            is_continuous=np.asarray(s.cont, bool),
            features=tuple(s.features),
            audio_loss_mask=np.asarray(s.audio_loss, bool),
            text_loss_mask=np.asarray(s.text_loss, bool),
        )

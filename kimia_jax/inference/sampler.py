"""Batched, jit-friendly twin of the reference sampler `KimiASampler` (llm.md §6.6).

Per stream (text and audio have separate `SamplingParams`), for logits [B, V]:
1. Repetition penalty, only if `penalty > 1` and the row's history length is strictly greater than
   `window`: every distinct id among the last `window` history entries is penalised once, from its
   original value (`l * p` if `l < 0` else `l / p`). The history is the stream's own record, forced
   blanks included.
2. `lp = log_softmax(l)` in float32.
3. `temperature > 1e-6`: sample from `softmax(lp / temperature)` restricted to the `top_k` best ids
   (all ids when `top_k <= 0`), with an explicit PRNG key. Otherwise greedy `argmax(lp)` (first
   index on ties, like torch.argmax).

The reference handles B = 1 only (`logits[0]`); here every row has its own history buffer
[B, MAX] int32 and length [B], so the function runs inside a jitted `lax.while_loop`.

Sampling cannot be bit-identical to torch.multinomial (different RNGs); the support set (top-k),
the distribution and the greedy path are. Top-k sampling draws `jax.random.categorical` on the
scaled top-k log-probabilities; torch normalises `exp(lp / T)` of the same k values, which only
differs when some of those probabilities underflow to 0 in float32 (torch never picks them, JAX
picks them with probability < 1e-38; torch raises when all k underflow, JAX then returns the best).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

GREEDY_TEMPERATURE = 1e-6  # reference: `temperature > 1e-6` samples, anything else is greedy


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one stream; hashable, so it can be a static jit argument.

    No defaults here: the defaults are `Sampling`'s (the official `generate` arguments), and
    `Sampling().text` / `Sampling().audio` are the default per-stream parameters.

    Attributes:
        temperature: <= 1e-6 means greedy.
        top_k: restrict sampling to the k best ids; <= 0 samples from the full distribution.
        repetition_penalty: > 1 enables the penalty.
        repetition_window: number of most recent history entries penalised.
    """

    temperature: float
    top_k: int
    repetition_penalty: float
    repetition_window: int

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_window < 1:
            raise ValueError(f"repetition_window must be >= 1, got {self.repetition_window}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def _arg(default: Any, help: str) -> Any:  # noqa: A002 - the absl flag's word
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """The official `KimiAudio.generate` sampling arguments: names and defaults (spec/llm.md §9).

    The one definition used by `KimiAudio.generate*` (`**sampling`), by the compiled loop
    (`.text` / `.audio` give each stream's `SamplingParams`) and by the launcher's flags (one
    flag per field, help from the field metadata). `max_new_tokens` is the text-mode budget
    (-1: 7500 - prompt length; "both" mode always uses 1500 - prompt length, as the official).
    """

    audio_temperature: float = _arg(0.0, "Audio sampling temperature (<= 1e-6: greedy).")
    audio_top_k: int = _arg(5, "Audio top-k (<= 0: the full distribution).")
    text_temperature: float = _arg(0.0, "Text sampling temperature (<= 1e-6: greedy).")
    text_top_k: int = _arg(5, "Text top-k (<= 0: the full distribution).")
    audio_repetition_penalty: float = _arg(1.0, "Audio repetition penalty (> 1 enables it).")
    audio_repetition_window_size: int = _arg(64, "Audio tokens the penalty looks back over.")
    text_repetition_penalty: float = _arg(1.0, "Text repetition penalty (> 1 enables it).")
    text_repetition_window_size: int = _arg(16, "Text tokens the penalty looks back over.")
    max_new_tokens: int = _arg(-1, "Text-mode step budget (-1: 7500 - prompt length).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = float if f.type in ("float", float) else int
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                raise TypeError(f"{f.name} must be {kind.__name__}, got {v!r}")
        for stream in ("audio", "text"):
            if getattr(self, f"{stream}_temperature") < 0:
                raise ValueError(f"{stream}_temperature must be >= 0")
            if getattr(self, f"{stream}_repetition_penalty") <= 0:
                raise ValueError(f"{stream}_repetition_penalty must be > 0")
            if getattr(self, f"{stream}_repetition_window_size") < 1:
                raise ValueError(f"{stream}_repetition_window_size must be >= 1")
        if self.max_new_tokens < 1 and self.max_new_tokens != -1:
            raise ValueError(f"max_new_tokens must be -1 or >= 1, got {self.max_new_tokens}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def text(self) -> SamplingParams:
        return SamplingParams(
            self.text_temperature,
            self.text_top_k,
            self.text_repetition_penalty,
            self.text_repetition_window_size,
        )

    @property
    def audio(self) -> SamplingParams:
        return SamplingParams(
            self.audio_temperature,
            self.audio_top_k,
            self.audio_repetition_penalty,
            self.audio_repetition_window_size,
        )


def apply_repetition_penalty(
    logits: jax.Array,
    history: jax.Array,
    history_len: jax.Array,
    penalty: float,
    window: int,
) -> jax.Array:
    """Penalises the last `window` history ids of each row whose history is longer than `window`.

    Args:
        logits: [B, V] float.
        history: [B, MAX] int, the stream's recorded tokens; entries >= history_len are ignored.
        history_len: [B] (or scalar) int, number of valid history entries per row.
        penalty: repetition penalty (> 1 to have an effect).
        window: number of most recent entries considered.

    Returns:
        [B, V] logits, same dtype.
    """
    if penalty <= 1.0:
        return logits
    b, v = logits.shape
    max_len = history.shape[1]
    history_len = jnp.broadcast_to(jnp.asarray(history_len, jnp.int32), (b,))
    idx = history_len[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :]  # [B, W]
    active = (history_len > window)[:, None] & (idx >= 0)  # strictly longer than the window
    ids = jnp.take_along_axis(history, jnp.clip(idx, 0, max_len - 1), axis=1)  # [B, W]
    ids = jnp.clip(ids, 0, v - 1)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
    # Counting hits (instead of a scatter-set) keeps duplicates harmless: each id once, from
    # its original value, as the reference gather -> penalise -> scatter does.
    hits = jnp.zeros((b, v), jnp.int32).at[rows, ids].add(active.astype(jnp.int32)) > 0
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(hits, penalised, logits)


def sample(
    logits: jax.Array,
    history: jax.Array,
    history_len: jax.Array,
    params: SamplingParams,
    key: jax.Array,
) -> jax.Array:
    """One sampling step of one stream (reference `sample_{text,audio}_logits`).

    Args:
        logits: [B, V] (or [B, T, V]: the last position is used, as in the reference).
        history: [B, MAX] int32 history buffer of this stream.
        history_len: [B] or scalar int32 valid history length (the reference passes `prev[:i]`,
            so i).
        params: static sampling parameters.
        key: PRNG key (unused when greedy).

    Returns:
        [B] int32 sampled ids.
    """
    if logits.ndim == 3:
        logits = logits[:, -1]
    logits = apply_repetition_penalty(
        logits, history, history_len, params.repetition_penalty, params.repetition_window
    )
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if params.greedy:
        return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
    scaled = logprobs / params.temperature
    if params.top_k > 0:
        if params.top_k > scaled.shape[-1]:
            raise ValueError(f"top_k={params.top_k} exceeds the vocabulary ({scaled.shape[-1]})")
        top_vals, top_idx = jax.lax.top_k(scaled, params.top_k)  # [B, k], descending
        choice = jax.random.categorical(key, top_vals, axis=-1)  # [B]
        return jnp.take_along_axis(top_idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

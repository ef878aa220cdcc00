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

import jax
import jax.numpy as jnp

GREEDY_TEMPERATURE = 1e-6  # reference: `temperature > 1e-6` samples, anything else is greedy


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one stream; hashable, so it can be a static jit argument.

    Attributes:
        temperature: <= 1e-6 means greedy.
        top_k: restrict sampling to the k best ids; <= 0 samples from the full distribution.
        repetition_penalty: > 1 enables the penalty.
        repetition_window: number of most recent history entries penalised.
    """

    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    repetition_window: int = 16

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

    @classmethod
    def text_default(cls) -> SamplingParams:
        """`KimiAudio.generate` text defaults (also infer.py's): greedy, window 16."""
        return cls(temperature=0.0, top_k=5, repetition_penalty=1.0, repetition_window=16)

    @classmethod
    def audio_default(cls) -> SamplingParams:
        """`KimiAudio.generate` audio defaults: greedy, top_k 5, window 64."""
        return cls(temperature=0.0, top_k=5, repetition_penalty=1.0, repetition_window=64)

    @classmethod
    def audio_readme(cls) -> SamplingParams:
        """infer.py / README audio parameters: temperature 0.8, top_k 10, window 64."""
        return cls(temperature=0.8, top_k=10, repetition_penalty=1.0, repetition_window=64)


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

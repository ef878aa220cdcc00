"""The reference sampler (KimiASampler, spec/llm.md §6.6), batched and jit-friendly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One stream's sampler settings (hashable: a static argument of the compiled loop)."""

    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    repetition_window: int = 16

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-6


GREEDY = SamplingParams()


def apply_repetition_penalty(
    logits: jax.Array, history: jax.Array, length: jax.Array, penalty: float, window: int
) -> jax.Array:
    """Penalises ids among the last `window` recorded tokens, only once length > window.

    logits [B, V]; history [B, N] recorded tokens (positions >= length unused); length scalar.
    Each id is penalised once from its original value: l*p if l < 0 else l/p.
    """
    if penalty <= 1.0 or window <= 0:
        return logits
    b, v = logits.shape
    n = history.shape[1]
    idx = jnp.arange(n)
    in_window = (idx >= length - window) & (idx < length)  # [N]
    hit = (
        jnp.zeros((b, v), bool)
        .at[jnp.arange(b)[:, None], history]
        .max(jnp.broadcast_to(in_window, history.shape))
    )
    hit = hit & (length > window)
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(hit, penalised, logits)


def sample(
    logits: jax.Array, history: jax.Array, length: jax.Array, params: SamplingParams, key: jax.Array
) -> jax.Array:
    """One token per row from logits [B, V] (fp32) -> [B] int32."""
    logits = apply_repetition_penalty(
        logits.astype(jnp.float32),
        history,
        length,
        params.repetition_penalty,
        params.repetition_window,
    )
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if params.greedy:
        return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
    scaled = logprobs / params.temperature
    if params.top_k > 0:
        top_vals, top_idx = jax.lax.top_k(scaled, params.top_k)
        choice = jax.random.categorical(key, top_vals, axis=-1)
        return jnp.take_along_axis(top_idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

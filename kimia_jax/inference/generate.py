"""Compiled dual-stream generation: prefill + the whole decode loop in one jitted function.

Implements the reference `_generate_loop` (spec/llm.md §6) for a batch of right-padded prompts:
each row has its own prompt length, positions, step budget, stop state and histories
(`stream_logic.StreamState`); the loop runs inside `lax.while_loop` over a static, donated KV
cache until every row has stopped. Step i samples both streams from the last logits, applies the
bookkeeping of `stream_logic.advance` (6-step audio delay, text EOS, stop tokens), and feeds the
recorded tokens at position `len_b + i` to get the next logits.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import LlmConfig
from kimia_jax.inference import stream_logic
from kimia_jax.inference.sampler import Sampling, SamplingParams
from kimia_jax.inference.stream_logic import StreamConfig, StreamState  # noqa: F401 (re-export)
from kimia_jax.layers.kv_cache import KVCache
from kimia_jax.models.kimia_llm import KimiaLLM, init_cache
from kimia_jax.text.conversation import PromptBatch

DEFAULT = Sampling()  # the official defaults: greedy text and audio


@flax.struct.dataclass
class GenerateOutput:
    state: StreamState  # histories, counters, per-row done
    num_steps: jax.Array  # [B] forward calls per row (prefill included)
    trace: dict[str, jax.Array]  # per-step last-position logits [steps, B, V] when traced


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries; resumable (`start` then `resume`, for streaming)."""

    stream: StreamState
    cache: KVCache
    lengths: jax.Array  # [B] prompt lengths
    next_text: jax.Array  # [B] tokens to feed at the next forward
    next_audio: jax.Array
    num_steps: jax.Array  # [B] forward calls per row
    key: jax.Array
    trace: dict[str, jax.Array]

    def output(self) -> GenerateOutput:
        return GenerateOutput(state=self.stream, num_steps=self.num_steps, trace=self.trace)


def returned_tokens(
    out: GenerateOutput, cfg: StreamConfig, row: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(text_tokens, audio_tokens) of one row exactly as the reference `_generate_loop` returns."""
    audio, text = stream_logic.returned_tokens(cfg, out.state)[row]
    return np.asarray(text, np.int64), np.asarray(audio, np.int64)


_STATIC = ("model", "stream", "text_sampling", "audio_sampling", "trace")


def _step(
    s: DecodeState, text_logits: jax.Array, audio_logits: jax.Array, stream: StreamConfig,
    text_sampling: SamplingParams, audio_sampling: SamplingParams, trace: bool,
) -> DecodeState:  # fmt: skip
    """Samples step `s.stream.step` from its logits and applies the stream bookkeeping."""
    key, sub = jax.random.split(s.key)
    live = ~s.stream.done
    trace_upd = s.trace
    if trace:
        i = s.stream.step
        trace_upd = {
            "text_logits": s.trace["text_logits"].at[i].set(text_logits),
            "audio_logits": s.trace["audio_logits"].at[i].set(audio_logits),
        }
    st, nt, na = stream_logic.sample_and_advance(
        stream, s.stream, text_logits, audio_logits, sub, text_sampling, audio_sampling
    )
    return s.replace(stream=st, next_text=nt, next_audio=na, num_steps=s.num_steps + live,
                     key=key, trace=trace_upd)  # fmt: skip


def _start(
    params: Any, prompt: PromptBatch, budget: jax.Array, key: jax.Array, *, model: KimiaLLM,
    max_steps: int, stream: StreamConfig, text_sampling: SamplingParams,
    audio_sampling: SamplingParams, cache_length: int | None, cache: KVCache | None, trace: bool,
) -> DecodeState:  # fmt: skip
    """Prefill + step 0 (sampling from the prefill logits)."""
    b, t = prompt.audio_ids.shape
    lengths = prompt.lengths.astype(jnp.int32)
    if cache is None:
        cache = init_cache(model.cfg, b, cache_length or t + max_steps)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = model.apply(
        {"params": params},
        prompt.audio_ids.astype(jnp.int32),
        prompt.text_ids.astype(jnp.int32),
        positions,
        prompt.features,
        prompt.is_continuous,
        cache,
        attend_cache=False,
        logits_at=lengths - 1,
    )
    tr: dict[str, jax.Array] = {}
    if trace:
        v = out.text_logits.shape[-1]
        tr = {k: jnp.zeros((max_steps, b, v), jnp.float32) for k in ("text_logits", "audio_logits")}
    zeros = jnp.zeros((b,), jnp.int32)
    state = DecodeState(
        stream=StreamState.init(budget, max_steps), cache=out.cache, lengths=lengths,
        next_text=zeros, next_audio=zeros, num_steps=zeros, key=key, trace=tr,
    )  # fmt: skip
    return _step(state, out.text_logits[:, 0], out.audio_logits[:, 0], stream, text_sampling,
                 audio_sampling, trace)  # fmt: skip


def _resume(
    params: Any, state: DecodeState, until: jax.Array, *, model: KimiaLLM, stream: StreamConfig,
    text_sampling: SamplingParams, audio_sampling: SamplingParams, trace: bool,
) -> DecodeState:  # fmt: skip
    """Decodes until every row stopped or `until` steps are done (one while_loop)."""

    def body(s: DecodeState) -> DecodeState:
        pos = (s.lengths + s.stream.step - 1)[:, None]
        o = model.apply(
            {"params": params}, s.next_audio[:, None], s.next_text[:, None], pos, None, None,
            s.cache, attend_cache=True,
        )  # fmt: skip
        return _step(s.replace(cache=o.cache), o.text_logits[:, 0], o.audio_logits[:, 0],
                     stream, text_sampling, audio_sampling, trace)  # fmt: skip

    cond = lambda s: (s.stream.step < until) & ~s.stream.all_done  # noqa: E731
    return jax.lax.while_loop(cond, body, state)


@functools.partial(
    jax.jit, static_argnames=(*_STATIC, "max_steps", "cache_length"), donate_argnames=("cache",)
)
def generate(
    params: Any,
    prompt: PromptBatch,
    budget: jax.Array,
    key: jax.Array,
    *,
    model: KimiaLLM,
    max_steps: int,
    stream: StreamConfig,
    text_sampling: SamplingParams = DEFAULT.text,
    audio_sampling: SamplingParams = DEFAULT.audio,
    cache_length: int | None = None,
    cache: KVCache | None = None,
    trace: bool = False,
) -> GenerateOutput:
    """Prefill and decode a batch of prompts in one compiled call.

    Args:
      params: KimiaLLM params.
      prompt: right-padded `PromptBatch`; row b's prompt occupies positions [0, lengths[b]).
      budget: [B] int32 steps per row (the reference's max_new_tokens, `stream_logic.budgets`).
      key: PRNG key for sampling (unused by greedy streams).
      model: the KimiaLLM module (hashable; static).
      max_steps: static bound >= max(budget): history size and loop bound.
      stream: static stream ids and output_type.
      text_sampling, audio_sampling: per-stream sampler settings (static), `Sampling.text` /
        `Sampling.audio` (default: the official defaults).
      cache_length: static cache size (default T + max_steps).
      cache: optional preallocated cache to donate (e.g. already sharded).
      trace: also return per-step logits (parity tests).
    """
    kw = dict(model=model, stream=stream, text_sampling=text_sampling,
              audio_sampling=audio_sampling, trace=trace)  # fmt: skip
    state = _start(params, prompt, budget, key, max_steps=max_steps, cache_length=cache_length,
                   cache=cache, **kw)  # fmt: skip
    return _resume(params, state, jnp.int32(max_steps), **kw).output()


start = functools.partial(
    jax.jit, static_argnames=(*_STATIC, "max_steps", "cache_length"), donate_argnames=("cache",)
)(_start)
start.__doc__ = "Jitted prefill + step 0; returns a DecodeState to `resume` (streaming)."
resume = functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))(_resume)
resume.__doc__ = "Jitted: decode until `until` steps (or all rows stopped); donates the state."


def generate_fixed(
    params: Any, prompt: PromptBatch, key: jax.Array, *, max_new_tokens: int, **kw: Any
) -> GenerateOutput:
    """`generate` with the same budget of `max_new_tokens` steps for every row."""
    b = prompt.audio_ids.shape[0]
    budget = jnp.full((b,), max_new_tokens, jnp.int32)
    return generate(params, prompt, budget, key, max_steps=max_new_tokens, **kw)


def check_prompt(
    cfg: LlmConfig, prompt: PromptBatch, max_new_tokens: int, cache_length: int | None
) -> None:
    """Host-side validation: clear errors instead of silent clamping inside XLA."""
    if prompt.padding != "right":
        raise ValueError("the decode loop takes right-padded prompts (batch(..., padding='right'))")
    a, t = np.asarray(prompt.audio_ids), np.asarray(prompt.text_ids)
    lengths = np.asarray(prompt.lengths)
    if a.ndim != 2 or a.shape != t.shape:
        raise ValueError(f"audio_ids {a.shape} and text_ids {t.shape} must both be [B, T]")
    if a.size == 0:
        raise ValueError("empty prompt: need at least one position and one row")
    if lengths.shape != (a.shape[0],) or (lengths < 1).any() or (lengths > a.shape[1]).any():
        raise ValueError(
            f"lengths {lengths.tolist()} must be in [1, {a.shape[1]}] for each of {a.shape[0]} rows"
        )
    for name, x in (("audio_ids", a), ("text_ids", t)):
        bad = (x < 0) | (x >= cfg.vocab_size)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(
                f"{name}[{r}, {c}] = {x[r, c]} is outside the vocabulary [0, {cfg.vocab_size})"
            )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    need = a.shape[1] + max_new_tokens
    if cache_length is not None and need > cache_length:
        raise ValueError(
            f"prompt of {a.shape[1]} positions + {max_new_tokens} new tokens = {need} exceeds the "
            f"KV cache length {cache_length}"
        )
    if need > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {a.shape[1]} positions + {max_new_tokens} new tokens = {need} exceeds "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    if prompt.features is not None:
        f = np.asarray(prompt.features)
        if f.shape != (*a.shape, cfg.kimia_adaptor_input_dim):
            raise ValueError(f"features {f.shape} must be [B, T, {cfg.kimia_adaptor_input_dim}]")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or inf")

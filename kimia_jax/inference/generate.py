"""Compiled dual-stream generation: prefill + the whole decode loop in one jitted function.

Implements the reference `_generate_loop` (spec/llm.md §6) for a batch of right-padded prompts:
each row has its own prompt length, positions, stop state and histories; the loop runs inside
`lax.while_loop` over a static, donated KV cache until every row stopped or the budget is spent.

Per step i (0-based) and row b:
  1. sample text and audio tokens from the last logits (both always sampled);
  2. text: after EOS -> blank; at EOS -> finished (EOS fed back once); else valid_text += 1;
  3. audio: i < 6 or output_type "text" -> blank; else valid_audio += 1;
  4. stop: "text" when the text stream finished, "both" when audio hit msg_end/media_end;
  5. otherwise feed (audio, text) at position len_b + i and compute the next logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import LlmConfig
from kimia_jax.inference import sampling
from kimia_jax.models.kimia_llm import KimiaLLM, KVCache, init_cache

AUDIO_DELAY = (
    6  # hard-coded in the reference kimia.py (config's kimia_mimo_audiodelaytokens unused)
)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Stream-control ids, taken from the tokenizer (never recomputed from num_base_tokens)."""

    blank: int  # kimia_text_blank
    text_eos: int  # kimia_text_eos
    msg_end: int
    media_end: int


@flax.struct.dataclass
class Prompt:
    """A batch of right-padded prompts (host arrays or device arrays).

    audio_ids, text_ids: [B, T] int32; continuous_mask: [B, T] bool; features: [B, T, Din] float
    (zeros off the mask) or None; lengths: [B] int32 true prompt lengths (>= 1).
    """

    audio_ids: Any
    text_ids: Any
    lengths: Any
    features: Any = None
    continuous_mask: Any = None


@flax.struct.dataclass
class GenerateOutput:
    text_tokens: jax.Array  # [B, max_new] text history (as recorded, blanks after EOS)
    audio_tokens: jax.Array  # [B, max_new] audio history (blanks for the delay / text mode)
    num_steps: jax.Array  # [B] steps taken (forward calls, prefill included)
    valid_text: jax.Array  # [B] text tokens before EOS: returned text = text_tokens[:valid_text]
    valid_audio: jax.Array  # [B] returned audio = audio_tokens[6 : 6 + valid_audio]
    trace: dict[str, jax.Array]  # per-step logits/argmax when traced, else {}


@flax.struct.dataclass
class _State:
    i: jax.Array
    cache: KVCache
    text_logits: jax.Array  # [B, V] fp32 logits of the last forward call
    audio_logits: jax.Array
    text_hist: jax.Array  # [B, N]
    audio_hist: jax.Array
    text_finished: jax.Array  # [B] bool
    done: jax.Array  # [B] bool
    num_steps: jax.Array
    valid_text: jax.Array
    valid_audio: jax.Array
    key: jax.Array
    trace: dict[str, jax.Array]


def returned_tokens(out: GenerateOutput, row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(text_tokens, audio_tokens) of one row exactly as the reference `_generate_loop` returns."""
    nt, na = int(out.valid_text[row]), int(out.valid_audio[row])
    text = np.asarray(out.text_tokens[row, :nt])
    audio = np.asarray(out.audio_tokens[row, AUDIO_DELAY : AUDIO_DELAY + na])
    return text, audio


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "output_type",
        "ids",
        "text_sampling",
        "audio_sampling",
        "cache_length",
        "trace",
    ),
    donate_argnames=("cache",),
)
def generate(
    params: Any,
    prompt: Prompt,
    key: jax.Array,
    *,
    model: KimiaLLM,
    max_new_tokens: int,
    output_type: str,
    ids: SpecialIds,
    text_sampling: sampling.SamplingParams = sampling.GREEDY,
    audio_sampling: sampling.SamplingParams = sampling.GREEDY,
    cache_length: int | None = None,
    cache: KVCache | None = None,
    trace: bool = False,
) -> GenerateOutput:
    """Prefill and decode `max_new_tokens` steps for a batch of prompts in one compiled call.

    Args:
      params: KimiaLLM params.
      prompt: right-padded batch; row b's prompt occupies positions [0, lengths[b]).
      key: PRNG key for sampling (unused by greedy streams).
      model: the KimiaLLM module (hashable; static).
      max_new_tokens: loop budget (static), as the reference's max_new_tokens.
      output_type: "text" or "both".
      ids: stream-control ids.
      text_sampling, audio_sampling: per-stream sampler settings (static).
      cache_length: static cache size (default T + max_new_tokens).
      cache: optional preallocated cache to donate (e.g. already sharded).
      trace: also return per-step logits (parity tests).
    """
    if output_type not in ("text", "both"):
        raise ValueError(f"output_type must be 'text' or 'both', got {output_type!r}")
    cfg = model.cfg
    b, t = prompt.audio_ids.shape
    n = max_new_tokens
    if cache is None:
        cache = init_cache(cfg, b, cache_length or t + n)
    lengths = prompt.lengths.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = model.apply(
        {"params": params},
        prompt.audio_ids.astype(jnp.int32),
        prompt.text_ids.astype(jnp.int32),
        positions,
        prompt.features,
        prompt.continuous_mask,
        cache,
        attend_cache=False,
        logits_at=lengths - 1,
    )
    v = out.text_logits.shape[-1]
    zeros_i = jnp.zeros((b,), jnp.int32)
    tr: dict[str, jax.Array] = {}
    if trace:
        tr = {
            "text_logits": jnp.zeros((n, b, v), jnp.float32),
            "audio_logits": jnp.zeros((n, b, v), jnp.float32),
        }
    state = _State(
        i=jnp.int32(0),
        cache=out.cache,
        text_logits=out.text_logits[:, 0],
        audio_logits=out.audio_logits[:, 0],
        text_hist=jnp.zeros((b, n), jnp.int32),
        audio_hist=jnp.zeros((b, n), jnp.int32),
        text_finished=jnp.zeros((b,), bool),
        done=jnp.zeros((b,), bool),
        num_steps=zeros_i,
        valid_text=zeros_i,
        valid_audio=zeros_i,
        key=key,
        trace=tr,
    )

    def step(s: _State) -> _State:
        """Sample + bookkeeping for step s.i from s.*_logits (rows already done are frozen)."""
        k_text, k_audio, key_next = jax.random.split(s.key, 3)
        nt = sampling.sample(s.text_logits, s.text_hist, s.i, text_sampling, k_text)
        na = sampling.sample(s.audio_logits, s.audio_hist, s.i, audio_sampling, k_audio)
        live = ~s.done
        nt = jnp.where(s.text_finished, ids.blank, nt)
        at_eos = ~s.text_finished & (nt == ids.text_eos)
        valid_text = s.valid_text + (live & ~s.text_finished & ~at_eos)
        text_finished = s.text_finished | (live & at_eos)
        if output_type == "text":
            na = jnp.full_like(na, ids.blank)
            valid_audio = s.valid_audio
        else:
            na = jnp.where(s.i < AUDIO_DELAY, ids.blank, na)
            valid_audio = s.valid_audio + (live & (s.i >= AUDIO_DELAY))
        audio_finished = (na == ids.msg_end) | (na == ids.media_end)
        stop = text_finished if output_type == "text" else audio_finished
        col = jax.nn.one_hot(s.i, n, dtype=bool)[None, :] & live[:, None]
        trace_upd = s.trace
        if trace:
            trace_upd = {
                "text_logits": s.trace["text_logits"].at[s.i].set(s.text_logits),
                "audio_logits": s.trace["audio_logits"].at[s.i].set(s.audio_logits),
            }
        return s.replace(
            text_hist=jnp.where(col, nt[:, None], s.text_hist),
            audio_hist=jnp.where(col, na[:, None], s.audio_hist),
            text_finished=jnp.where(live, text_finished, s.text_finished),
            done=s.done | (live & stop),
            num_steps=s.num_steps + live,
            valid_text=valid_text,
            valid_audio=valid_audio,
            key=key_next,
            trace=trace_upd,
        )

    def forward(s: _State) -> _State:
        """Feeds step s.i-1's recorded tokens at position len + s.i - 1; next logits."""
        fed_a = jax.lax.dynamic_index_in_dim(s.audio_hist, s.i - 1, axis=1)  # [B, 1]
        fed_t = jax.lax.dynamic_index_in_dim(s.text_hist, s.i - 1, axis=1)
        pos = (lengths + s.i - 1)[:, None]
        o = model.apply(
            {"params": params}, fed_a, fed_t, pos, None, None, s.cache, attend_cache=True
        )
        return s.replace(
            cache=o.cache, text_logits=o.text_logits[:, 0], audio_logits=o.audio_logits[:, 0]
        )

    def cond(s: _State) -> jax.Array:
        return (s.i < n) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        s = step(forward(s))
        return s.replace(i=s.i + 1)

    state = step(state).replace(i=jnp.int32(1))
    state = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(
        text_tokens=state.text_hist,
        audio_tokens=state.audio_hist,
        num_steps=state.num_steps,
        valid_text=state.valid_text,
        valid_audio=state.valid_audio,
        trace=state.trace,
    )


def check_prompt(
    cfg: LlmConfig, prompt: Prompt, max_new_tokens: int, cache_length: int | None
) -> None:
    """Host-side validation: clear errors instead of silent clamping inside XLA."""
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

"""Dual-stream generation bookkeeping of `KimiAudio._generate_loop` (llm.md §6.1-§6.5), batched.

One decode step i (all rows share i) of the reference, after the forward and the two samples:

4. text: if the row's text stream is finished, the token becomes blank; elif it is
   `kimia_text_eos`, the stream finishes (the eos itself is recorded and fed back once, and
   `valid_text` is not incremented); else `valid_text += 1`. `text_history[i] = token`.
5. audio: if `i < 6` (the audio delay) or output_type == "text", the token becomes blank; else
   `valid_audio += 1`. `audio_history[i] = token`.
6. `audio_finished = token in {msg_end, media_end}`.
7. the row stops if (text mode and text finished) or (both mode and audio finished), or when its
   budget of steps is used up; otherwise its next inputs are (audio token, text token) at RoPE
   position `prompt_len + i`.

`advance` is a pure function of (config, state, sampled tokens) for jit / `lax.while_loop`; rows
that are done are frozen (their history and counters no longer change), so a batch runs until
every row is done. The host-side functions at the bottom turn the final state into the
reference's returned lists (§6.4) and the `generate` post-processing (§6.5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import OutputType
from kimia_jax.inference.sampler import SamplingParams, sample
from kimia_jax.text.conversation import AUDIO_DELAY
from kimia_jax.text.tokenizer import ExtraTokens

BOTH_MAX_TOKENS = int(12.5 * 120)  # "both": max_new_tokens = 1500 - T, caller's value ignored
TEXT_MAX_TOKENS = 7500  # "text" with max_new_tokens == -1: 7500 - T


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Static ids and mode of the loop; hashable (a static jit argument).

    Attributes:
        output_type: `OutputType` (validated at the API edge; not re-checked here).
        text_blank: `kimia_text_blank` (filler of both streams).
        text_eos: `kimia_text_eos`.
        eod_ids: audio-stream stop ids, `(msg_end, media_end)` in the reference.
        audio_delay: number of leading audio samples replaced by blanks (6).
    """

    output_type: OutputType
    text_blank: int
    text_eos: int
    eod_ids: tuple[int, ...]
    audio_delay: int = AUDIO_DELAY

    @classmethod
    def from_extra_tokens(cls, extra: ExtraTokens, output_type: OutputType) -> StreamConfig:
        return cls(
            output_type=output_type,
            text_blank=extra.kimia_text_blank,
            text_eos=extra.kimia_text_eos,
            eod_ids=(extra.msg_end, extra.media_end),
        )


@flax.struct.dataclass
class StreamState:
    """Per-row loop state (the reference's locals, one row per batch element).

    Attributes:
        step: [] int32, index i of the next step (shared by all rows).
        text_history: [B, MAX] int32, `text_previous_tokens` (what was recorded at each step).
        audio_history: [B, MAX] int32, `previous_audio_tokens`.
        text_finished: [B] bool, `text_stream_is_finished`.
        valid_text: [B] int32, `valid_text_length`.
        valid_audio: [B] int32, `valid_audio_length`.
        done: [B] bool, the row has stopped (stop condition or budget).
        budget: [B] int32, the row's `max_new_tokens`.
    """

    step: jax.Array
    text_history: jax.Array
    audio_history: jax.Array
    text_finished: jax.Array
    valid_text: jax.Array
    valid_audio: jax.Array
    done: jax.Array
    budget: jax.Array

    @classmethod
    def init(cls, budget: jax.Array | np.ndarray | Sequence[int], max_steps: int) -> StreamState:
        """Fresh state for rows with the given step budgets ([B]); MAX = max_steps >= budgets."""
        budget = jnp.asarray(budget, jnp.int32)
        if budget.ndim != 1:
            raise ValueError(f"budget must be [B], got shape {budget.shape}")
        try:
            too_small = int(jnp.max(budget)) > max_steps
        except jax.errors.ConcretizationTypeError:  # traced budgets: the caller sized MAX
            too_small = False
        if too_small:
            raise ValueError(f"max_steps={max_steps} is smaller than the largest budget")
        b = budget.shape[0]
        zeros = jnp.zeros((b,), jnp.int32)
        return cls(
            step=jnp.zeros((), jnp.int32),
            text_history=jnp.zeros((b, max_steps), jnp.int32),
            audio_history=jnp.zeros((b, max_steps), jnp.int32),
            text_finished=jnp.zeros((b,), bool),
            valid_text=zeros,
            valid_audio=zeros,
            done=budget <= 0,  # range(max_new_tokens) with max_new_tokens <= 0 runs nothing
            budget=budget,
        )

    @property
    def all_done(self) -> jax.Array:
        return jnp.all(self.done)


def budgets(
    output_type: OutputType, prompt_lengths: Sequence[int] | np.ndarray, max_new_tokens: int = -1
) -> np.ndarray:
    """Per-row `max_new_tokens` as `KimiAudio.generate` sets it (§6.1).

    "both": 1500 - T (the caller's value is ignored); "text": 7500 - T when max_new_tokens == -1,
    else max_new_tokens. T is the row's prompt length.
    """
    t = np.asarray(prompt_lengths, np.int64)
    if output_type == OutputType.BOTH:
        return (BOTH_MAX_TOKENS - t).astype(np.int32)
    if max_new_tokens == -1:
        return (TEXT_MAX_TOKENS - t).astype(np.int32)
    return np.full(t.shape, max_new_tokens, np.int32)


def advance(
    cfg: StreamConfig, state: StreamState, text_token: jax.Array, audio_token: jax.Array
) -> tuple[StreamState, jax.Array, jax.Array]:
    """Applies §6.3 steps 4-7 to the sampled tokens of step `state.step`.

    Args:
        cfg: static loop config.
        state: state before step i.
        text_token: [B] int, the text sample of step i.
        audio_token: [B] int, the audio sample of step i.

    Returns:
        (state after step i, next text input [B], next audio input [B]). The next inputs are
        what the reference feeds at step i + 1 (RoPE position prompt_len + i); for rows that are
        done they are blanks and must not matter.
    """
    i = state.step
    active = ~state.done
    nt = jnp.asarray(text_token, jnp.int32)
    na = jnp.asarray(audio_token, jnp.int32)
    blank = jnp.int32(cfg.text_blank)

    # 4. text stream
    was_finished = state.text_finished
    nt = jnp.where(was_finished, blank, nt)
    is_eos = ~was_finished & (nt == cfg.text_eos)
    text_finished = was_finished | is_eos
    valid_text = state.valid_text + (~text_finished).astype(jnp.int32)

    # 5. audio stream: delayed, and always blank in text mode
    force_blank = (i < cfg.audio_delay) | (cfg.output_type == OutputType.TEXT)
    na = jnp.where(force_blank, blank, na)
    valid_audio = state.valid_audio + jnp.where(force_blank, 0, 1).astype(jnp.int32)

    # 6./7. stop conditions
    audio_finished = jnp.zeros_like(active)
    for eod in cfg.eod_ids:
        audio_finished = audio_finished | (na == eod)
    stop = text_finished if cfg.output_type == OutputType.TEXT else audio_finished
    stop = stop | (i + 1 >= state.budget)

    # Rows that were already done keep everything as it was.
    def keep(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(active, new, old)

    col = jnp.clip(i, 0, state.text_history.shape[1] - 1)
    text_col = jax.lax.dynamic_index_in_dim(state.text_history, col, axis=1, keepdims=False)
    audio_col = jax.lax.dynamic_index_in_dim(state.audio_history, col, axis=1, keepdims=False)
    text_history = jax.lax.dynamic_update_index_in_dim(
        state.text_history, keep(nt, text_col), col, axis=1
    )
    audio_history = jax.lax.dynamic_update_index_in_dim(
        state.audio_history, keep(na, audio_col), col, axis=1
    )
    new_state = StreamState(
        step=i + 1,
        text_history=text_history,
        audio_history=audio_history,
        text_finished=keep(text_finished, state.text_finished),
        valid_text=keep(valid_text, state.valid_text),
        valid_audio=keep(valid_audio, state.valid_audio),
        done=state.done | (active & stop),
        budget=state.budget,
    )
    return new_state, keep(nt, blank), keep(na, blank)


def sample_and_advance(
    cfg: StreamConfig,
    state: StreamState,
    text_logits: jax.Array,
    audio_logits: jax.Array,
    key: jax.Array,
    text_params: SamplingParams,
    audio_params: SamplingParams,
) -> tuple[StreamState, jax.Array, jax.Array]:
    """Samples both streams of step `state.step` (§6.3 steps 2-3) and applies `advance`.

    Args:
        cfg: static loop config.
        state: state before step i.
        text_logits, audio_logits: [B, V] last-position logits of step i's forward.
        key: PRNG key for this step (split internally: text first, then audio).
        text_params, audio_params: static sampling parameters.

    Returns:
        As `advance`.
    """
    k_text, k_audio = jax.random.split(key)
    hist_len = jnp.broadcast_to(state.step, state.done.shape)  # reference passes prev[:i]
    nt = sample(text_logits, state.text_history, hist_len, text_params, k_text)
    na = sample(audio_logits, state.audio_history, hist_len, audio_params, k_audio)
    return advance(cfg, state, nt, na)


# -- host side: returned lists (§6.4) and post-processing (§6.5) --------------------------------


def returned_tokens(cfg: StreamConfig, state: StreamState) -> list[tuple[list[int], list[int]]]:
    """Per row, `(audio_tokens, text_tokens)` exactly as `_generate_loop` returns them.

    text = text_history[:valid_text] (every token before the first eos, nothing else filtered);
    audio = audio_history[6 : 6 + valid_audio] (ends with the stop token when stopped on it).
    """
    text_h = np.asarray(state.text_history)
    audio_h = np.asarray(state.audio_history)
    vt = np.asarray(state.valid_text)
    va = np.asarray(state.valid_audio)
    d = cfg.audio_delay
    return [
        (audio_h[b, d : d + va[b]].tolist(), text_h[b, : vt[b]].tolist())
        for b in range(text_h.shape[0])
    ]


def detokenize_text(
    text_ids: Sequence[int], text_eos: int, decode_fn: Callable[[list[int]], str]
) -> str:
    """`KimiAudio.detokenize_text`: cut at the first text eos, then decode."""
    ids: list[int] = []
    for t in text_ids:
        if t == text_eos:
            break
        ids.append(int(t))
    return decode_fn(ids)


def postprocess(
    audio_tokens: Sequence[int],
    text_tokens: Sequence[int],
    *,
    kimia_token_offset: int,
    text_eos: int,
    decode_fn: Callable[[list[int]], str],
) -> tuple[np.ndarray, str]:
    """`KimiAudio.generate` after the loop: (semantic codes [n] int64, text).

    Audio keeps ids >= kimia_token_offset and subtracts the offset (the detokenizer input,
    `[1, n]` in the reference); text keeps ids < kimia_token_offset, cut at the first eos, decoded.
    """
    codes = np.asarray([t for t in audio_tokens if t >= kimia_token_offset], np.int64)
    codes = codes - kimia_token_offset
    text_ids = [int(t) for t in text_tokens if t < kimia_token_offset]
    return codes, detokenize_text(text_ids, text_eos, decode_fn)

"""The compiled side of continuous batching: a fixed number of decode slots over one KV cache.

Every slot is one row of the compiled dual-stream loop with its own step counter, prompt length,
budget, output type and sampling parameters, so requests join and leave at any step:

    state = SlotState.init(cfg, slots, capacity, max_top_k)
    state = prefill_chunk(params, state, slot, chunk..., start)   # chunked prefill into a slot
    state = prefill_last(params, state, slot, chunk..., row)      # last chunk + step 0 sampled
    state = decode(params, state, live, n)                         # n steps of every live slot

The per-row bookkeeping is `stream_logic.advance` of the compiled loop, applied row by row (each
row's step i instead of one shared step), for both output types; the sampler is the batched
twin of `sampler.sample` with per-row (traced) parameters. Greedy rows therefore give the tokens
that `generate.generate` gives the same prompt alone (tests/serving/engine_test.py).

A slot's cache row is written from position 0 by its prefill and at `length + step - 1` by each
decode step before that position is attended to, and attention is causal by position, so what an
earlier request left in the row is never seen. Rows that are not live write to the last cache
position, which no live row can see before overwriting it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from kimia_jax.configs import LlmConfig, OutputType
from kimia_jax.inference import stream_logic
from kimia_jax.inference.sampler import GREEDY_TEMPERATURE
from kimia_jax.inference.stream_logic import StreamConfig, StreamState
from kimia_jax.layers.kv_cache import KVCache
from kimia_jax.models.kimia_llm import KimiaLLM, init_cache


@flax.struct.dataclass
class RowParams:
    """Per-row sampling parameters ([B] each; traced, unlike `SamplingParams`)."""

    temperature: jax.Array  # float32; <= 1e-6 greedy
    top_k: jax.Array  # int32; <= 0 the full distribution
    penalty: jax.Array  # float32; > 1 enables the repetition penalty
    window: jax.Array  # int32

    @classmethod
    def zeros(cls, b: int) -> RowParams:
        return cls(
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            penalty=jnp.ones((b,), jnp.float32),
            window=jnp.ones((b,), jnp.int32),
        )


@flax.struct.dataclass
class Row:
    """What a request puts into its slot when its prefill ends (one row, leading axis 1)."""

    length: jax.Array  # [1] prompt length
    budget: jax.Array  # [1] steps
    is_both: jax.Array  # [1] bool, output_type "both"
    key: jax.Array  # [1] PRNG key data (uint32 [1, 2])
    text: RowParams
    audio: RowParams


@flax.struct.dataclass
class SlotState:
    cache: KVCache  # [L, S, C, K, H]
    stream: StreamState  # step is [S] here: one counter per row
    lengths: jax.Array  # [S]
    next_text: jax.Array  # [S]
    next_audio: jax.Array  # [S]
    is_both: jax.Array  # [S] bool
    keys: jax.Array  # [S, 2] uint32 raw key data
    text: RowParams
    audio: RowParams

    @classmethod
    def init(cls, cfg: LlmConfig, slots: int, capacity: int) -> SlotState:
        """Empty slots; built by one jitted call so every leaf is its own (donatable) buffer."""
        return jax.jit(functools.partial(cls._init, cfg, slots, capacity))()

    @classmethod
    def _init(cls, cfg: LlmConfig, slots: int, capacity: int) -> SlotState:
        z = jnp.zeros((slots,), jnp.int32)
        st = StreamState.init(z, capacity)
        st = st.replace(step=z, done=jnp.ones((slots,), bool))
        return cls(
            cache=init_cache(cfg, slots, capacity),
            stream=st,
            lengths=z,
            next_text=z,
            next_audio=z,
            is_both=jnp.zeros((slots,), bool),
            keys=jnp.zeros((slots, 2), jnp.uint32),
            text=RowParams.zeros(slots),
            audio=RowParams.zeros(slots),
        )

    @property
    def capacity(self) -> int:
        return self.cache.capacity


# ----------------------------------------------------------------------------------------------
# per-row sampling and bookkeeping


def _penalise(logits: jax.Array, history: jax.Array, hlen: jax.Array, p: RowParams) -> jax.Array:
    """`sampler.apply_repetition_penalty` with per-row penalty and window (traced)."""
    b, v = logits.shape
    pos = jnp.arange(history.shape[1], dtype=jnp.int32)[None, :]
    active = (
        (p.penalty > 1.0)[:, None]
        & (hlen > p.window)[:, None]
        & (pos >= (hlen - p.window)[:, None])
        & (pos < hlen[:, None])
    )
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], history.shape)
    ids = jnp.clip(history, 0, v - 1)
    hits = jnp.zeros((b, v), jnp.int32).at[rows, ids].add(active.astype(jnp.int32)) > 0
    pen = p.penalty[:, None]
    penalised = jnp.where(logits < 0, logits * pen, logits / pen)
    return jnp.where(hits, penalised, logits)


def sample_rows(
    logits: jax.Array,
    history: jax.Array,
    hlen: jax.Array,
    p: RowParams,
    keys: jax.Array,
    max_top_k: int,
) -> jax.Array:
    """`sampler.sample` for [B, V] logits with per-row parameters and per-row keys [B] (typed).

    Greedy rows: argmax of the log-softmax of the (penalised) logits, as the static sampler.
    Sampling rows: `categorical` over the scaled log-probs restricted to the row's top_k best
    (top_k in [1, max_top_k]; a larger or <= 0 top_k samples the full distribution).
    """
    # the penalty and the sampling branch run only when some row needs them (lax.cond)
    logits = jax.lax.cond(
        jnp.any(p.penalty > 1.0), lambda x: _penalise(x, history, hlen, p), lambda x: x, logits
    )
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    greedy = jnp.argmax(lp, axis=-1).astype(jnp.int32)
    is_greedy = p.temperature <= GREEDY_TEMPERATURE

    def sampled(lp: jax.Array) -> jax.Array:
        scaled = lp / jnp.maximum(p.temperature, GREEDY_TEMPERATURE)[:, None]
        k = min(max_top_k, scaled.shape[-1])
        top_vals, top_idx = jax.lax.top_k(scaled, k)
        rank = jnp.arange(k, dtype=jnp.int32)[None, :]
        top_vals = jnp.where(rank < p.top_k[:, None], top_vals, -jnp.inf)
        pick_top = jax.vmap(lambda kk, x: jax.random.categorical(kk, x))(keys, top_vals)
        from_top = jnp.take_along_axis(top_idx, pick_top[:, None], axis=-1)[:, 0]
        from_all = jax.vmap(lambda kk, x: jax.random.categorical(kk, x))(keys, scaled)
        use_top = (p.top_k > 0) & (p.top_k <= k)
        return jnp.where(is_greedy, greedy, jnp.where(use_top, from_top, from_all))

    out = jax.lax.cond(jnp.all(is_greedy), lambda lp: greedy, sampled, lp)
    return out.astype(jnp.int32)


def _advance_rows(
    cfgs: tuple[StreamConfig, StreamConfig],
    st: StreamState,
    is_both: jax.Array,
    nt: jax.Array,
    na: jax.Array,
) -> tuple[StreamState, jax.Array, jax.Array]:
    """`stream_logic.advance` per row (own step counter), text or both mode per row."""

    def one(cfg: StreamConfig, s: StreamState, t: jax.Array, a: jax.Array):
        row = jax.tree.map(lambda x: x[None], s).replace(step=s.step)
        new, t2, a2 = stream_logic.advance(cfg, row, t[None], a[None])
        return jax.tree.map(lambda x: x[0], new.replace(step=new.step[None])), t2[0], a2[0]

    text = jax.vmap(functools.partial(one, cfgs[0]))(st, nt, na)
    both = jax.vmap(functools.partial(one, cfgs[1]))(st, nt, na)

    def pick(x_both: jax.Array, x_text: jax.Array) -> jax.Array:
        sel = is_both.reshape(is_both.shape + (1,) * (x_both.ndim - 1))
        return jnp.where(sel, x_both, x_text)

    return jax.tree.map(pick, both, text)


def _step_rows(
    st: StreamState,
    is_both: jax.Array,
    keys: jax.Array,
    text_p: RowParams,
    audio_p: RowParams,
    text_logits: jax.Array,
    audio_logits: jax.Array,
    cfgs: tuple[StreamConfig, StreamConfig],
    max_top_k: int,
) -> tuple[StreamState, jax.Array, jax.Array]:
    """Samples each row's step `st.step[b]` and advances it (rows that are done stay frozen).

    Row b's key for step i is `fold_in(key_b, i)`, split into text and audio keys, so a request's
    samples do not depend on which slot it sits in or who shares the batch.
    """
    k = jax.vmap(
        lambda kd, i: jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(kd), i))
    )(keys, st.step)
    nt = sample_rows(text_logits, st.text_history, st.step, text_p, k[:, 0], max_top_k)
    na = sample_rows(audio_logits, st.audio_history, st.step, audio_p, k[:, 1], max_top_k)
    return _advance_rows(cfgs, st, is_both, nt, na)


# ----------------------------------------------------------------------------------------------
# compiled entry points


def _row_cache(cache: KVCache, slot: jax.Array) -> KVCache:
    take = lambda x, ax: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=ax)  # noqa: E731
    return KVCache(k=take(cache.k, 1), v=take(cache.v, 1), length=take(cache.length, 0))


def _put_row_cache(cache: KVCache, row: KVCache, slot: jax.Array) -> KVCache:
    put = lambda x, r, ax: jax.lax.dynamic_update_slice_in_dim(x, r, slot, axis=ax)  # noqa: E731
    return KVCache(
        k=put(cache.k, row.k, 1), v=put(cache.v, row.v, 1), length=put(cache.length, row.length, 0)
    )


def _forward_chunk(params, state, slot, audio_ids, text_ids, features, cont, start, last, model):
    """One prefill chunk [1, C] of a slot at positions start..start+C-1 (attending over the
    slot's cache: the chunks before it)."""
    c = audio_ids.shape[1]
    row = _row_cache(state.cache, slot)
    pos = (start + jnp.arange(c, dtype=jnp.int32))[None, :]
    out = model.apply(
        {"params": params},
        audio_ids,
        text_ids,
        pos,
        features,
        cont,
        row,
        attend_cache=True,
        logits_at=jnp.reshape(last, (1,)),
    )
    return state.replace(cache=_put_row_cache(state.cache, out.cache, slot)), out


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("state",))
def prefill_chunk(params, state, slot, audio_ids, text_ids, features, cont, start, *, model):
    """Writes one chunk of a prompt into slot `slot`'s cache (no sampling)."""
    state, _ = _forward_chunk(
        params, state, slot, audio_ids, text_ids, features, cont, start, jnp.int32(0), model
    )
    return state


@functools.partial(
    jax.jit, static_argnames=("model", "cfgs", "max_top_k"), donate_argnames=("state",)
)
def prefill_last(
    params,
    state,
    slot,
    audio_ids,
    text_ids,
    features,
    cont,
    start,
    row: Row,
    *,
    model: KimiaLLM,
    cfgs: tuple[StreamConfig, StreamConfig],
    max_top_k: int,
):
    """The last chunk of a prompt, then the slot's row is reset for this request and its step 0
    is sampled from the logits of the last prompt position (`generate._start`)."""
    last = row.length[0] - 1 - start
    state, out = _forward_chunk(
        params, state, slot, audio_ids, text_ids, features, cont, start, last, model
    )
    cap = state.stream.text_history.shape[1]
    fresh = StreamState.init(row.budget, cap)
    fresh = fresh.replace(step=jnp.zeros((1,), jnp.int32))
    st, nt, na = _step_rows(
        fresh,
        row.is_both,
        row.key,
        row.text,
        row.audio,
        out.text_logits[:, 0],
        out.audio_logits[:, 0],
        cfgs,
        max_top_k,
    )
    put = lambda x, r: jax.lax.dynamic_update_slice_in_dim(x, r.astype(x.dtype), slot, 0)  # noqa: E731
    return state.replace(
        stream=jax.tree.map(put, state.stream, st),
        lengths=put(state.lengths, row.length),
        next_text=put(state.next_text, nt),
        next_audio=put(state.next_audio, na),
        is_both=put(state.is_both, row.is_both),
        keys=put(state.keys, row.key),
        text=jax.tree.map(put, state.text, row.text),
        audio=jax.tree.map(put, state.audio, row.audio),
    )


@functools.partial(
    jax.jit, static_argnames=("model", "cfgs", "max_top_k"), donate_argnames=("state",)
)
def decode(
    params,
    state: SlotState,
    live: jax.Array,
    n: jax.Array,
    *,
    model: KimiaLLM,
    cfgs: tuple[StreamConfig, StreamConfig],
    max_top_k: int,
) -> SlotState:
    """Up to `n` decode steps of every live row (`live` [S] bool: the slot holds a running
    request); stops early once no live row is left undone."""
    cap = state.capacity

    def body(c):
        i, s = c
        run = live & ~s.stream.done
        pos = jnp.where(run, s.lengths + s.stream.step - 1, cap - 1)[:, None]
        o = model.apply(
            {"params": params},
            s.next_audio[:, None],
            s.next_text[:, None],
            pos,
            None,
            None,
            s.cache,
            attend_cache=True,
        )
        st, nt, na = _step_rows(
            s.stream,
            s.is_both,
            s.keys,
            s.text,
            s.audio,
            o.text_logits[:, 0],
            o.audio_logits[:, 0],
            cfgs,
            max_top_k,
        )
        # rows that are not live keep their state (their forward wrote only the last position)
        keep = lambda new, old: jnp.where(  # noqa: E731
            run.reshape(run.shape + (1,) * (new.ndim - 1)), new, old
        )
        st = jax.tree.map(keep, st, s.stream)
        return i + 1, s.replace(
            cache=o.cache,
            stream=st,
            next_text=keep(nt, s.next_text),
            next_audio=keep(na, s.next_audio),
        )

    def cond(c):
        i, s = c
        return (i < n) & jnp.any(live & ~s.stream.done)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def stream_configs(extra: Any) -> tuple[StreamConfig, StreamConfig]:
    """(text-mode, both-mode) stream configs from the tokenizer's extra tokens."""
    return (
        StreamConfig.from_extra_tokens(extra, OutputType.TEXT),
        StreamConfig.from_extra_tokens(extra, OutputType.BOTH),
    )

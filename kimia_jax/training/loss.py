"""Two-stream training loss (training.md §3.5, §6.1).

The official fine-tuning loss (`finetune.compute_loss`) is, per stream s in (text, audio),

    loss_s = sum_t CE(logits_s[t], labels_s[t]) * mask_s[t] / (sum_t mask_s[t] + 1e-4)

over the whole (micro-)batch and the full vocabulary, and `loss = loss_audio + loss_text`. This
module computes exactly that ("stream_mean", the default) plus two reductions for packed batches:

* "token_mean": every supervised token of both streams weighs the same:
  (sum CE_text * m_text + sum CE_audio * m_audio) / (n_text + n_audio + 1e-4).
* "segment_mean": every packed example (segment id > 0) weighs the same: the official loss of each
  example alone, averaged over the examples of the global batch. A packed row then gives the same
  per-example losses (and, summed, the same gradients) as its examples run one by one.

Per-stream weights (`text_weight`, `audio_weight`) scale the two stream terms; per-task weights come
in as a per-position `loss_weight` (constant within an example) that scales the CE terms.

Cross-entropy is computed from the final hidden states and the head matrix in chunks of positions
(`head_cross_entropy`): the fp32 logits of one chunk [B, C, V] exist at a time and are recomputed in
the backward pass (`jax.checkpoint`), so a [B, T, 168448] fp32 tensor is never materialized, in
either direction. With `LossConfig.sparse` (default) the CE runs only where the loss mask is set
(`masked_head_cross_entropy`): the masked positions of each row are gathered into a compact buffer
and the head runs over its needed prefix only, so the head matmuls cost in proportion to the
supervised positions (a few % of an ASR row's text stream); the values and gradients are those
of the dense path (the masked-off CE terms contribute exact zeros there).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from kimia_jax import sharding
from kimia_jax.layers.linear import matmul_t

LOSS_EPS = 1e-4  # the official denominator guard
Reduction = Literal["stream_mean", "token_mean", "segment_mean"]
REDUCTIONS = ("stream_mean", "token_mean", "segment_mean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """How the two streams' cross-entropies are reduced.

    Attributes:
      reduction: "stream_mean" (official), "token_mean" or "segment_mean" (module docstring).
      text_weight, audio_weight: multipliers of the text / audio stream terms (official: 1, 1).
      ce_chunk: positions per cross-entropy chunk (peak logits memory is B * ce_chunk * V * 4 B).
      max_segments: most packed examples per row (static; segment ids 1..max_segments), used by
        "segment_mean" and the per-example metrics.
      sparse: CE only at the positions whose loss mask is set (`masked_head_cross_entropy`),
        and the train step skips the audio branch (MIMO layers + audio head) of a micro-batch
        without audio loss position; same loss and gradients as the dense path (False).
      sparse_chunk: the fewest positions per row the sparse CE runs the head over (it picks
        sparse_chunk, 2 sparse_chunk, ... up to ce_chunk, or a loop of ce_chunk chunks).
    """

    reduction: Reduction = "stream_mean"
    text_weight: float = 1.0
    audio_weight: float = 1.0
    ce_chunk: int = 512
    max_segments: int = 8
    sparse: bool = True
    sparse_chunk: int = 64

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"LossConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}"
            )
        if self.ce_chunk < 1 or self.max_segments < 1 or self.sparse_chunk < 1:
            raise ValueError("LossConfig.ce_chunk, sparse_chunk and max_segments must be >= 1")


def head_cross_entropy(
    hidden: jax.Array, head: jax.Array, labels: jax.Array, *, chunk: int = 512
) -> tuple[jax.Array, jax.Array]:
    """Full-vocabulary cross-entropy of `logits = hidden @ head.T` at every position.

    Args:
      hidden: [B, T, D] final hidden states (after the head's RMSNorm), compute dtype.
      head: [V, D] head matrix (`lm_head` / `mimo_output` weight); cast to hidden's dtype, as the
        model's own head does; the logits accumulate in fp32.
      labels: [B, T] int target ids (any valid id where the loss is masked).
      chunk: positions per chunk.
    Returns:
      (ce, logsumexp), both [B, T] float32: ce = logsumexp(logits) - logits[label].
    """
    b, t, _ = hidden.shape
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    w = head.astype(hidden.dtype)

    @jax.checkpoint
    def one(h: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:  # [B, C, D], [B, C]
        logits = matmul_t(h, w, preferred_element_type=jnp.float32)  # [B, C, V] fp32
        logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return lse - target, lse

    if n == 1:
        return one(hidden, labels)
    hp = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, -1).swapaxes(0, 1)
    yp = jnp.pad(labels, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)
    ce, lse = jax.lax.map(lambda xs: one(*xs), (hp, yp))  # [n, B, C]
    return (
        ce.swapaxes(0, 1).reshape(b, n * c)[:, :t],
        lse.swapaxes(0, 1).reshape(b, n * c)[:, :t],
    )


def masked_head_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk: int = 64,
    max_chunk: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """`head_cross_entropy` only where `mask` is set (zeros elsewhere), at a cost in proportion to
    the largest number of masked positions in a row (`needed`).

    Each row's masked positions are gathered, in order, to the front of a compact [B, T] buffer
    (stable argsort of the mask). The head then runs over its first `s` positions only, both
    passes, `s` picked at run time (`lax.switch`, one decision on every device of a mesh): the
    smallest of chunk, 2 chunk, 4 chunk, ... max_chunk that holds `needed` in one matmul, or
    beyond max_chunk a loop over ceil(needed / max_chunk) chunks of max_chunk positions (the
    dense path's chunking). The results go back to their positions by the inverse permutation;
    gradients flow back through both gathers (exactly zero at unmasked positions, as in the dense
    path).

    Args:
      hidden, head, labels: as `head_cross_entropy`.
      mask: [B, T] loss mask (bool or numbers; set where > 0).
      chunk: the smallest number of positions per row the head runs over.
      max_chunk: the most positions per row in one head matmul (`LossConfig.ce_chunk`).
    Returns:
      (ce, logsumexp), both [B, T] float32, 0 where the mask is not set.
    """
    b, t, _ = hidden.shape
    m = mask > 0
    order = jnp.argsort(~m, axis=1, stable=True)  # masked positions first, in position order
    inverse = jnp.argsort(order, axis=1)
    needed = jnp.max(jnp.sum(m, axis=1)).astype(jnp.int32)  # compact [0, needed): every masked one
    big = min(max_chunk, t)
    pad = -(-t // big) * big - t
    h = jnp.pad(jnp.take_along_axis(hidden, order[..., None], axis=1), ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(jnp.take_along_axis(labels, order, axis=1).astype(jnp.int32), ((0, 0), (0, pad)))
    ce, lse = _compact_ce(h, head, y, needed, _sizes(min(chunk, big), big))

    def back(x: jax.Array) -> jax.Array:
        return jnp.where(m, jnp.take_along_axis(x[:, :t], inverse, axis=1), 0.0)

    return back(ce), back(lse)


def _sizes(c: int, big: int) -> tuple[int, ...]:
    """Single-matmul row counts c, 2c, 4c, ... < big, then big."""
    out = []
    while c < big:
        out.append(c)
        c *= 2
    return (*out, big)


def _branch(needed: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    """0: nothing to do; j + 1: one matmul over sizes[j] rows; len(sizes) + 1: the loop."""
    j = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), needed, side="left")
    return jnp.where(needed == 0, 0, j + 1)


def _chunk_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """[B, C, D] x [V, D] -> [B, C, V] fp32 logits (as `head_cross_entropy`'s chunks)."""
    logits = matmul_t(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def _ce_rows(h: jax.Array, w: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = _chunk_logits(h, w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0], lse


def _ce_rows_bwd(h, w, y, g_ce, g_lse) -> tuple[jax.Array, jax.Array]:
    """(dh [B, C, D] in h's dtype, dw [V, D] fp32) of rows with cotangents g_ce, g_lse [B, C]."""
    logits = _chunk_logits(h, w)
    p = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    # d(lse - logits[y]) / d logits = softmax - onehot(y); d lse / d logits = softmax
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.bool_)
    d = ((g_ce + g_lse)[..., None] * p - jnp.where(onehot, g_ce[..., None], 0.0)).astype(h.dtype)
    dh = jnp.einsum("bcv,vd->bcd", d, w.astype(h.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcv,bcd->vd", d, h, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw


def _slice(x: jax.Array, i: jax.Array, c: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)


def _pad_rows(x: jax.Array, tp: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, tp - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _compact_ce(
    h: jax.Array, w: jax.Array, y: jax.Array, needed: jax.Array, sizes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """(ce, lse) [B, Tp] of the compact rows [0, needed) (other rows: 0 or their CE).

    A custom VJP: both passes pick the same branch at run time (`_branch`) and run no head matmul
    beyond it. (A run-time trip count is not reverse-differentiable, and autodiff of a `cond`
    per chunk hands the head's residuals, a [V, D] zeros block per skipped chunk, out of every
    branch.) The backward recomputes the logits (nothing [B, T, V] is stored) and accumulates
    the head's gradient in fp32.
    """
    return _compact_ce_fwd(h, w, y, needed, sizes)[0]


def _compact_ce_fwd(h, w, y, needed, sizes):
    b, tp, _ = h.shape
    big = sizes[-1]

    def none(h, w, y):
        z = jnp.zeros((b, tp), jnp.float32)
        return z, z

    def rows(s):
        return lambda h, w, y: tuple(_pad_rows(x, tp) for x in _ce_rows(h[:, :s], w, y[:, :s]))

    def loop(h, w, y):
        def body(i, carry):
            ce, lse = carry
            ce_c, lse_c = _ce_rows(_slice(h, i, big), w, _slice(y, i, big))
            ce = jax.lax.dynamic_update_slice_in_dim(ce, ce_c, i * big, axis=1)
            return ce, jax.lax.dynamic_update_slice_in_dim(lse, lse_c, i * big, axis=1)

        return jax.lax.fori_loop(0, (needed + big - 1) // big, body, none(h, w, y))

    branches = [none, *(rows(s) for s in sizes), loop]
    out = jax.lax.switch(_branch(needed, sizes), branches, h, w, y)
    return out, (h, w, y, needed)


def _compact_ce_bwd(sizes, res, g):
    h, w, y, needed = res
    g_ce, g_lse = g
    tp = h.shape[1]
    big = sizes[-1]

    def none(h, w, y, g_ce, g_lse):
        return jnp.zeros_like(h), jnp.zeros(w.shape, jnp.float32)

    def rows(s):
        def run(h, w, y, g_ce, g_lse):
            dh, dw = _ce_rows_bwd(h[:, :s], w, y[:, :s], g_ce[:, :s], g_lse[:, :s])
            return _pad_rows(dh, tp), dw

        return run

    def loop(h, w, y, g_ce, g_lse):
        def body(i, carry):
            dh, dw = carry
            args = (_slice(x, i, big) for x in (h, y, g_ce, g_lse))
            hc, yc, gc, gl = args
            dh_c, dw_c = _ce_rows_bwd(hc, w, yc, gc, gl)
            return jax.lax.dynamic_update_slice_in_dim(dh, dh_c, i * big, axis=1), dw + dw_c

        init = none(h, w, y, g_ce, g_lse)
        return jax.lax.fori_loop(0, (needed + big - 1) // big, body, init)

    branches = [none, *(rows(s) for s in sizes), loop]
    dh, dw = jax.lax.switch(_branch(needed, sizes), branches, h, w, y, g_ce, g_lse)
    return dh, dw.astype(w.dtype), None, None


_compact_ce.defvjp(_compact_ce_fwd, _compact_ce_bwd)


def denominators(batch: dict[str, Any], cfg: LossConfig) -> dict[str, jax.Array]:
    """The global normalizers of a batch (all micro-batches): computed before the forward so that
    gradient accumulation over micro-batches gives exactly the loss of the whole batch.

    `batch` arrays may carry any leading axes ([A, B, T] or [B, T]).
    """
    mt = batch["text_loss_mask"].astype(jnp.float32)
    ma = batch["audio_loss_mask"].astype(jnp.float32)
    out = {"n_text": jnp.sum(mt), "n_audio": jnp.sum(ma)}
    seg = batch["segment_ids"].reshape(-1, batch["segment_ids"].shape[-1])
    present = jax.vmap(
        lambda s: jax.ops.segment_max(jnp.ones_like(s), s, num_segments=cfg.max_segments + 1)
    )(seg)  # [R, S+1]: 1 where a segment id occurs in the row, min-int where it does not
    out["n_segments"] = jnp.sum(present[:, 1:] > 0).astype(jnp.float32)
    return out


def _per_segment_sums(x: jax.Array, seg: jax.Array, num: int) -> jax.Array:
    """[B, T] values summed per (row, segment id) -> [B, num]."""
    return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num))(x, seg)


def kimia_loss(
    text_ce: jax.Array,
    audio_ce: jax.Array,
    batch: dict[str, Any],
    cfg: LossConfig,
    denoms: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reduces the per-position CE of both streams to the training loss.

    Args:
      text_ce, audio_ce: [B, T] float32 per-position CE (`head_cross_entropy`).
      batch: needs text_loss_mask, audio_loss_mask, segment_ids [B, T]; optional loss_weight [B, T].
      cfg: the reduction.
      denoms: global normalizers (`denominators` of the whole accumulated batch); default: this
        batch's own.
    Returns:
      (loss, metrics). metrics: loss_text, loss_audio (the two official masked means of this batch
      against the global counts), n_text, n_audio, and per-example `segment_loss_text`,
      `segment_loss_audio` [B, max_segments + 1] (index = segment id; 0 = padding, unused).
    """
    denoms = denominators(batch, cfg) if denoms is None else denoms
    mt = batch["text_loss_mask"].astype(jnp.float32)
    ma = batch["audio_loss_mask"].astype(jnp.float32)
    lw = batch.get("loss_weight")
    lw = jnp.ones_like(mt) if lw is None else lw.astype(jnp.float32)
    st = text_ce * mt * lw
    sa = audio_ce * ma * lw
    loss_text = jnp.sum(st) / (denoms["n_text"] + LOSS_EPS)
    loss_audio = jnp.sum(sa) / (denoms["n_audio"] + LOSS_EPS)

    seg = batch["segment_ids"].astype(jnp.int32)
    ns = cfg.max_segments + 1
    seg_text = _per_segment_sums(st, seg, ns) / (_per_segment_sums(mt, seg, ns) + LOSS_EPS)
    seg_audio = _per_segment_sums(sa, seg, ns) / (_per_segment_sums(ma, seg, ns) + LOSS_EPS)

    if cfg.reduction == "stream_mean":
        loss = cfg.text_weight * loss_text + cfg.audio_weight * loss_audio
    elif cfg.reduction == "token_mean":
        loss = (cfg.text_weight * jnp.sum(st) + cfg.audio_weight * jnp.sum(sa)) / (
            denoms["n_text"] + denoms["n_audio"] + LOSS_EPS
        )
    else:  # segment_mean
        per = cfg.text_weight * seg_text + cfg.audio_weight * seg_audio
        loss = jnp.sum(per[:, 1:]) / jnp.maximum(denoms["n_segments"], 1.0)
    metrics = dict(
        loss=loss,
        loss_text=loss_text,
        loss_audio=loss_audio,
        n_text=jnp.sum(mt),
        n_audio=jnp.sum(ma),
        segment_loss_text=seg_text,
        segment_loss_audio=seg_audio,
    )
    return loss, metrics

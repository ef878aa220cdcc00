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
and chunks that hold none are skipped, so the head matmuls cost in proportion to the supervised
positions (a few % of an ASR row's text stream); the values and gradients are those of the dense
path (the masked-off CE terms contribute exact zeros there).
"""

from __future__ import annotations

import dataclasses
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
      sparse_chunk: positions per row in one chunk of the sparse CE (the skip granularity).
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
    hidden: jax.Array, head: jax.Array, labels: jax.Array, mask: jax.Array, *, chunk: int = 64
) -> tuple[jax.Array, jax.Array]:
    """`head_cross_entropy` only where `mask` is set (zeros elsewhere), at a cost in proportion to
    the largest number of masked positions in a row.

    Each row's masked positions are gathered, in order, to the front of a [B, T] compact buffer
    (stable argsort of the mask); the buffer is cut into chunks of `chunk` positions and a chunk
    runs the head matmul only when some row still has a masked position in it (`lax.cond`; the
    skip test reduces over the whole batch, so it is one decision on every device of a mesh).
    The results go back to their positions by the inverse permutation; gradients flow back
    through both gathers (and are exactly zero at unmasked positions, as in the dense path).

    Args:
      hidden, head, labels: as `head_cross_entropy`.
      mask: [B, T] loss mask (bool or numbers; set where > 0).
      chunk: positions per row in one chunk.
    Returns:
      (ce, logsumexp), both [B, T] float32, 0 where the mask is not set.
    """
    b, t, _ = hidden.shape
    m = mask > 0
    order = jnp.argsort(~m, axis=1, stable=True)  # masked positions first, in position order
    inverse = jnp.argsort(order, axis=1)
    needed = jnp.max(jnp.sum(m, axis=1))  # compact positions [0, needed) hold every masked one
    h = jnp.take_along_axis(hidden, order[..., None], axis=1)
    y = jnp.take_along_axis(labels, order, axis=1)
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    w = head.astype(hidden.dtype)

    def one(h: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:  # [B, C, D], [B, C]
        logits = matmul_t(h, w, preferred_element_type=jnp.float32)  # [B, C, V] fp32
        logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return lse - target, lse

    def skip(h: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = jnp.zeros(y.shape, jnp.float32)
        return z, z

    # the checkpoint wraps the cond (not the reverse): the loop then saves only each chunk's
    # inputs (the head is a loop invariant), where a cond around a checkpoint would hand its
    # residuals, the head matrix included, out of every chunk
    @jax.checkpoint
    def maybe(xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        start, hc, yc = xs
        return jax.lax.cond(start < needed, one, skip, hc, yc)

    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, -1).swapaxes(0, 1)
    yp = jnp.pad(y, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)
    starts = jnp.arange(n, dtype=jnp.int32) * c
    ce, lse = jax.lax.map(maybe, (starts, hp, yp))  # [n, B, C]

    def back(x: jax.Array) -> jax.Array:
        x = x.swapaxes(0, 1).reshape(b, n * c)[:, :t]
        return jnp.where(m, jnp.take_along_axis(x, inverse, axis=1), 0.0)

    return back(ce), back(lse)


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

"""Attention: the one shared attention function, and Qwen2 attention over a static KV cache.

`dot_product_attention(q, k, v, mask=...)` is used by the LLM, both Whisper encoders and the DiT:
GQA by grouping query heads (query head i uses KV head i // (N // K); K/V are never repeated),
scores and softmax in float32, and one mask description (`AttentionMask`) for the kinds of
attention the models need:
  * causal by positions, bottom-right aligned over a KV cache: key s is visible to query t iff
    k_pos[s] <= q_pos[t] (spec/llm.md §3.2/§4);
  * block-causal (GLM-4-Voice's VQ encoder, spec/audio_tokenizer.md §4.4): also visible when query
    and key are in the same block of `block` positions;
  * key padding (whisper VQ, the DiT's key_mask), as a bool [B, S] or prefix lengths [B];
  * segment ids (packed training rows): attention never crosses segments.
Masks combine with `&`. Backends: "xla" (the reference; on CPU optionally looped over query
chunks so each score block stays in cache), "cudnn" (`jax.nn.dot_product_attention`,
implementation="cudnn", GPU, half precision), "pallas" (splash attention, TPU).

Qwen2 `Attention` caches into `kimia_jax.layers.kv_cache.KVCache`: per layer k, v [B, S, K, H]
(K = KV heads, keys stored after RoPE, values raw); the slot index equals the absolute position,
so the causal mask by positions is exactly the cache mask.
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from kimia_jax import sharding
from kimia_jax.layers import rope
from kimia_jax.layers.kv_cache import KVCache
from kimia_jax.layers.linear import Linear

LayerKV = tuple[jax.Array, jax.Array]  # (k, v) each [B, S, K, H]
Implementation = Literal["xla", "cudnn", "pallas"]
IMPLEMENTATIONS = ("xla", "cudnn", "pallas")
# Masked scores get this value (as the references add finfo.min): a row with no visible key
# then averages all values instead of producing NaN.
_MASKED = float(np.finfo(np.float32).min)


@flax.struct.dataclass
class AttentionMask:
    """Which keys each query may see. Build with the constructors, combine with `&`.

    Array fields (any may be None): q_positions [B|1, T], k_positions [B|1, S] int; k_valid
    [B, S] bool; kv_lengths [B] int (keys s < length valid); q_segments [B, T], k_segments [B, S].
    Static fields: causal (k_pos <= q_pos), block (block-causal: also same block of positions).
    Causal without positions means bottom-right aligned: q_pos = arange(T) + S - T, k_pos =
    arange(S) (the structured form the cuDNN / splash kernels take).
    """

    q_positions: jax.Array | None = None
    k_positions: jax.Array | None = None
    k_valid: jax.Array | None = None
    kv_lengths: jax.Array | None = None
    q_segments: jax.Array | None = None
    k_segments: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    block: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def make_causal(
        cls, q_positions: jax.Array | None = None, k_positions: jax.Array | None = None
    ) -> AttentionMask:
        """Key s visible to query t iff k_pos[s] <= q_pos[t].

        q_positions [B, T] (absolute positions of the queries); k_positions [B|1, S], by default
        the cache slots arange(S) when q_positions are given. No positions: bottom-right aligned.
        """
        if q_positions is not None and k_positions is None:
            raise ValueError("causal: give k_positions with q_positions (e.g. arange(S)[None])")
        if k_positions is not None and q_positions is None:
            raise ValueError("causal: k_positions given without q_positions")
        return cls(q_positions=q_positions, k_positions=k_positions, causal=True)

    @classmethod
    def make_block_causal(
        cls,
        block: int,
        q_positions: jax.Array | None = None,
        k_positions: jax.Array | None = None,
    ) -> AttentionMask:
        """GLM-4 VQ mask: visible iff k_pos <= q_pos or k_pos // block == q_pos // block."""
        if block <= 0:
            raise ValueError(f"block_causal: block must be positive, got {block}")
        m = cls.make_causal(q_positions, k_positions)
        return m.replace(block=int(block))

    @classmethod
    def make_padding(
        cls, k_valid: jax.Array | None = None, *, kv_lengths: jax.Array | None = None
    ) -> AttentionMask:
        """Key padding: k_valid bool [B, S], or kv_lengths [B] (keys s < length are valid)."""
        if (k_valid is None) == (kv_lengths is None):
            raise ValueError("padding: give exactly one of k_valid [B, S] or kv_lengths [B]")
        if k_valid is not None:
            k_valid = jnp.asarray(k_valid).astype(bool)
        return cls(k_valid=k_valid, kv_lengths=kv_lengths)

    @classmethod
    def make_segments(
        cls, q_segments: jax.Array, k_segments: jax.Array | None = None
    ) -> AttentionMask:
        """Packed rows: query t sees key s only if q_segments[t] == k_segments[s].

        k_segments defaults to q_segments (self-attention over the packed row).
        """
        return cls(
            q_segments=q_segments, k_segments=q_segments if k_segments is None else k_segments
        )

    def __and__(self, other: AttentionMask) -> AttentionMask:
        if self.causal and other.causal:
            raise ValueError("cannot combine two causal / block-causal masks")
        if self.q_segments is not None and other.q_segments is not None:
            raise ValueError("cannot combine two segment-id masks")
        src = self if self.causal else other
        k_valid = _and_opt(self.k_valid, other.k_valid)
        lengths = self.kv_lengths
        if lengths is None:
            lengths = other.kv_lengths
        elif other.kv_lengths is not None:
            lengths = jnp.minimum(lengths, other.kv_lengths)
        seg = self if self.q_segments is not None else other
        return AttentionMask(
            q_positions=src.q_positions,
            k_positions=src.k_positions,
            k_valid=k_valid,
            kv_lengths=lengths,
            q_segments=seg.q_segments,
            k_segments=seg.k_segments,
            causal=src.causal,
            block=src.block,
        )

    @property
    def has_positions(self) -> bool:
        """True when causality depends on traced positions (not a static structure)."""
        return self.q_positions is not None

    def resolved(self, t: int, s: int) -> AttentionMask:
        """This mask with default positions written out (q [1, T], k [1, S]), lengths as k_valid."""
        m = self
        if m.causal and m.q_positions is None:
            m = m.replace(
                q_positions=(jnp.arange(t, dtype=jnp.int32) + (s - t))[None],
                k_positions=jnp.arange(s, dtype=jnp.int32)[None],
            )
        if m.kv_lengths is not None:
            by_len = jnp.arange(s)[None, :] < jnp.asarray(m.kv_lengths)[:, None]
            m = m.replace(k_valid=_and_opt(m.k_valid, by_len), kv_lengths=None)
        return m

    def dense(self, t: int, s: int) -> jax.Array:
        """bool [B|1, T, S]: True where query t may see key s."""
        m = self.resolved(t, s)
        return _allowed(m, m.q_positions, m.q_segments)


def _and_opt(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _allowed(m: AttentionMask, q_pos: jax.Array | None, q_seg: jax.Array | None) -> jax.Array:
    """Dense bool [B|1, T|1, S] of a resolved mask, with the given query positions / segments."""
    ok = jnp.ones((1, 1), bool)
    if m.causal:
        kp, qp = m.k_positions[..., None, :], q_pos[..., :, None]
        vis = kp <= qp
        if m.block is not None:
            vis = vis | (kp // m.block == qp // m.block)
        ok = ok & vis
    if q_seg is not None:
        ok = ok & (q_seg[..., :, None] == m.k_segments[..., None, :])
    if m.k_valid is not None:
        ok = ok & m.k_valid[..., None, :]
    return ok


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: AttentionMask | None = None,
    scale: float | None = None,
    implementation: Implementation | None = None,
    q_chunk: int | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """Softmax attention with grouped KV heads.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H] with N a multiple of K (query head i uses KV
        head i // (N // K)).
      mask: which keys each query sees (None: all).
      scale: score multiplier; None is 1/sqrt(H) (applied as a division by sqrt(H)). Pass 1.0
        when q is already scaled (whisper scales q before the dot).
      implementation: "xla", "cudnn" (GPU, bf16/fp16 inputs), "pallas" (TPU splash attention) or
        None: "pallas" on TPU and "cudnn" on GPU where the inputs and mask suit the kernel,
        otherwise "xla". An explicit choice that cannot express the inputs raises ValueError.
      q_chunk: XLA on CPU only: loop over (batch, KV head, chunk of at most q_chunk queries;
        chunks balanced to need no padding) so each [G * chunk, S] score block stays in cache.
        Same math row by row; None = one block.
      precision: of the two dots (XLA path).
    Returns:
      [B, T, N, H] in q's dtype. Scores and softmax are float32; the probabilities are cast to
      q's dtype before the value product. A query that sees no key averages all values.
    """
    b, t, n, h = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != h or v.shape != k.shape:
        raise ValueError(
            f"attention: k and v must be [B, S, K, H] matching q {q.shape}, got {k.shape}, "
            f"{v.shape}"
        )
    if n % k.shape[2]:
        raise ValueError(f"attention: {n} query heads are not a multiple of {k.shape[2]} KV heads")
    impl = implementation or _auto_implementation(q, k, mask)
    if impl == "xla":
        chunked = q_chunk and t > q_chunk and jax.default_backend() == "cpu"
        if chunked:
            return _xla_chunked(q, k, v, mask, scale, q_chunk, precision)
        return _xla(q, k, v, mask, scale, precision)
    if impl == "cudnn":
        return _cudnn(q, k, v, mask, scale)
    if impl == "pallas":
        return _splash(q, k, v, mask, scale)
    raise ValueError(f"attention: implementation {impl!r} is not one of {IMPLEMENTATIONS}")


def _auto_implementation(q: jax.Array, k: jax.Array, mask: AttentionMask | None) -> str:
    backend = jax.default_backend()
    if backend == "gpu" and _cudnn_reason(q, k, mask) is None:
        return "cudnn"
    if backend == "tpu" and _splash_reason(q, k, mask) is None:
        return "pallas"
    return "xla"


def _scale_scores(s: jax.Array, scale: float | None, h: int) -> jax.Array:
    if scale is None:
        return s / math.sqrt(h)
    return s if scale == 1.0 else s * scale


def _xla(q, k, v, mask, scale, precision):
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32, precision=precision
    )
    scores = _scale_scores(scores, scale, h)
    if mask is not None:
        allowed = mask.dense(t, s_len)  # [B|1, T, S]
        scores = jnp.where(allowed[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(q.dtype), precision=precision)
    return out.reshape(b, t, n, h)


def _xla_chunked(q, k, v, mask, scale, chunk, precision):
    """The XLA math looped over (batch, KV head, query chunk) items: one flat `lax.map`.

    XLA:CPU's head-batched dots over full [T, S] scores (1500 x 1500 for whisper) run far below
    this loop, where each [G * chunk, S] block stays in cache (7x on 2 Zen 4 cores). One flat loop
    instead of nested maps: same speed, much faster to compile.
    """
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    nc = -(-t // chunk)
    chunk = -(-t // nc)  # balanced chunks: 1500 queries -> 12 x 125, no padded rows
    pad = nc * chunk - t
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nc, chunk, kh, g, h)
    qf = qc.transpose(0, 3, 1, 4, 2, 5).reshape(b * kh * nc, g * chunk, h)  # item (b, kv, c)
    kf = k.transpose(0, 2, 1, 3).reshape(b * kh, s_len, h)
    vf = v.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b * kh, s_len, h)

    allowed = None
    if mask is not None:  # computed once (not per item): [B|1, T|1, S], padded rows visible
        allowed = mask.dense(t, s_len)
        allowed = jnp.broadcast_to(allowed, (*allowed.shape[:2], s_len))
        if allowed.shape[1] > 1:
            allowed = jnp.pad(allowed, ((0, 0), (0, pad), (0, 0)), constant_values=True)

    def item(xs):
        qq, i = xs  # [G * C, H], flat item index
        bi, ki, ci = i // (kh * nc), (i // nc) % kh, i % nc
        s = jnp.dot(qq, kf[bi * kh + ki].T, preferred_element_type=jnp.float32, precision=precision)
        s = _scale_scores(s, scale, h)  # [G * C, S]
        if allowed is not None:
            ok = allowed[bi if allowed.shape[0] > 1 else 0]  # [T|1, S]
            if ok.shape[0] > 1:
                ok = jax.lax.dynamic_slice_in_dim(ok, ci * chunk, chunk)  # [C, S]
            s = jnp.where(ok, s.reshape(g, chunk, s_len), _MASKED).reshape(g * chunk, s_len)
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        return jnp.dot(p, vf[bi * kh + ki], precision=precision)

    out = jax.lax.map(item, (qf, jnp.arange(b * kh * nc)))  # [B*K*nc, G*C, H]
    out = out.reshape(b, kh, nc, g, chunk, h).transpose(0, 2, 4, 1, 3, 5)
    return out.reshape(b, nc * chunk, n, h)[:, :t]


# ------------------------------------------------------------------------------------------------
# cuDNN (GPU): jax.nn.dot_product_attention(implementation="cudnn")


def _cudnn_reason(q, k, mask) -> str | None:
    """Why the cuDNN kernel cannot take these inputs (None: it can)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention needs bf16/fp16 inputs, got {q.dtype}"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"cuDNN attention needs head_dim <= 128 and a multiple of 8, got {q.shape[-1]}"
    return None


def _cudnn(q, k, v, mask, scale):
    reason = _cudnn_reason(q, k, mask)
    if reason:
        raise ValueError(f"attention: implementation='cudnn': {reason}")
    t, s_len, h = q.shape[1], k.shape[1], q.shape[-1]
    kw = {}
    if mask is not None:
        rest = mask
        if mask.kv_lengths is not None:
            kw["key_value_seq_lengths"] = jnp.asarray(mask.kv_lengths, jnp.int32)
            rest = rest.replace(kv_lengths=None)
        if rest.causal and rest.block is None and not rest.has_positions and t == s_len:
            kw["is_causal"] = True  # cuDNN's causal is top-left = bottom-right when T == S
            rest = rest.replace(causal=False)
        if rest.causal or rest.k_valid is not None or rest.q_segments is not None:
            kw["mask"] = jnp.broadcast_to(rest.dense(t, s_len), (q.shape[0], t, s_len))[:, None]
    return jax.nn.dot_product_attention(
        q,
        k,
        v.astype(q.dtype),
        scale=1.0 / math.sqrt(h) if scale is None else scale,
        implementation="cudnn",
        **kw,
    )


# ------------------------------------------------------------------------------------------------
# Splash attention (TPU Pallas)

SPLASH_BLOCK = 128  # default splash block sizes: T and S must be multiples


def _splash_reason(q, k, mask) -> str | None:
    t, s_len = q.shape[1], k.shape[1]
    if t % SPLASH_BLOCK or s_len % SPLASH_BLOCK:
        return f"splash attention needs T and S multiples of {SPLASH_BLOCK}, got {t}, {s_len}"
    if mask is not None and mask.has_positions:
        return "splash attention needs a static causal structure, not traced positions"
    return None


def _splash_static_mask(t: int, s_len: int, mask: AttentionMask | None):
    """The splash (numpy-structured) mask for the causal / block-causal part of `mask`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if mask is None or not mask.causal:
        return sm.FullMask((t, s_len))
    if mask.block is None:
        return sm.CausalMask((t, s_len), offset=s_len - t)
    qp = np.arange(t)[:, None] + (s_len - t)
    kp = np.arange(s_len)[None, :]
    return sm.NumpyMask((kp <= qp) | (kp // mask.block == qp // mask.block))


def _splash_segments(b: int, t: int, s_len: int, mask: AttentionMask | None):
    """(q_ids [B, T], kv_ids [B, S]) int32 carrying segment ids and key padding, or None."""
    if mask is None or (
        mask.q_segments is None and mask.k_valid is None and mask.kv_lengths is None
    ):
        return None
    if mask.q_segments is not None:
        qs = jnp.broadcast_to(mask.q_segments, (b, t)).astype(jnp.int32)
        ks = jnp.broadcast_to(mask.k_segments, (b, s_len)).astype(jnp.int32)
    else:
        qs, ks = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s_len), jnp.int32)
    valid = mask.resolved(t, s_len).k_valid
    if valid is not None:  # a padded key gets an id no query has
        ks = jnp.where(valid, ks, jnp.min(qs) - 1)
    return qs, ks


def _make_splash_kernel(mask, heads: int, interpret: bool = False):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * heads), interpret=interpret)


def _splash(q, k, v, mask, scale):
    reason = _splash_reason(q, k, mask)
    if reason:
        raise ValueError(f"attention: implementation='pallas': {reason}")
    mesh = sharding.current_mesh()
    if mesh is None:
        return _splash_local(q, k, v, mask, scale)
    # A Pallas kernel is not partitioned by XLA: run it per shard (rows over the batch axes,
    # heads over the head axis when it divides both head counts), as the sharded LLM lays q out.
    b, t, n, h = q.shape
    bspec = sharding.spec_for(("batch",), (b,), mesh, name="attention/batch")[0]
    hspec = sharding.spec_for(("act_heads",), (n,), mesh, name="attention/heads")[0]
    h_axes = () if hspec is None else (hspec,) if isinstance(hspec, str) else tuple(hspec)
    if k.shape[2] % math.prod(mesh.shape[a] for a in h_axes):
        hspec = None  # KV heads not divisible: heads stay whole on every shard
    P = jax.sharding.PartitionSpec
    qkv = P(bspec, None, hspec, None)
    arrays = {"q_segments": None, "k_segments": None, "k_valid": None, "kv_lengths": None}
    specs = {}
    for name in arrays:
        x = getattr(mask, name) if mask is not None else None
        if x is not None:
            x = jnp.broadcast_to(x, (b, *jnp.shape(x)[1:])) if jnp.ndim(x) > 1 else x
            arrays[name] = x
            specs[name] = P(bspec, *([None] * (jnp.ndim(x) - 1)))
    present = {k_: x for k_, x in arrays.items() if x is not None}

    def local(qq, kk, vv, parts):
        m = None if mask is None else mask.replace(**{**arrays, **parts})
        return _splash_local(qq, kk, vv, m, scale)

    return jax.shard_map(
        local,
        in_specs=(qkv, qkv, qkv, {k_: specs[k_] for k_ in present}),
        out_specs=qkv,
        check_vma=False,
    )(q, k, v, present)


def _splash_local(q, k, v, mask, scale):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    q = q * (1.0 / math.sqrt(h) if scale is None else scale)  # splash does not scale
    kernel = _make_splash_kernel(_splash_static_mask(t, s_len, mask), g)
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.astype(q.dtype).transpose(0, 2, 1, 3)  # [B, K, S, H]
    seg = _splash_segments(b, t, s_len, mask)
    if seg is None:
        out = jax.vmap(jax.vmap(kernel))(qg, kt, vt)
    else:

        def per_row(qq, kk, vv, qs, ks):
            ids = sk.SegmentIds(q=qs, kv=ks)
            return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(qq, kk, vv)

        out = jax.vmap(per_row)(qg, kt, vt, *seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)  # [B, K, G, T, H] -> [B, T, N, H]


# ------------------------------------------------------------------------------------------------
# Qwen2 attention


class Attention(nn.Module):
    """Twin of Qwen2Attention (self_attn): q/k/v projections with bias, o_proj without.

    The projections are tagged with `checkpoint_name` ("query_proj", "key_proj", "value_proj",
    "out_proj") for the remat policies of `kimia_jax.models.kimia_llm`.

    `causal_by_index` (cache-less calls only: training rows) builds the mask from the static
    causal structure (key index <= query index) and the segment ids instead of the traced
    positions. It equals the positions mask exactly when positions strictly increase along the row
    within every segment (`examples.row_arrays` writes arange per packed example;
    `training.train_step.check_positions` enforces it on host batches); it lets the fused kernels
    (splash on TPU, cuDNN on GPU) take the call. `implementation` ("auto" or one of
    `IMPLEMENTATIONS`) is the kernel for those calls; calls with traced positions keep the
    automatic choice.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal_by_index: bool = False
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T] int32
        cache: KVCache | None = None,
        layer: int | jax.Array = 0,
        attend_cache: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | LayerKV]:
        """Returns (output [B, T, D], kv). `segment_ids` [B, T]: packed rows, attention stays
        within equal ids (no cache attention).

        With `cache` the new k/v are written into its layer `layer` at `positions[:, 0]` and kv is
        the updated cache; without, kv is the fresh (k, v) of this call. `attend_cache` selects
        the keys: the whole cache (decode, or a prefill continuing a conversation) or only this
        call's tokens (a prefill from position 0, which avoids attending over the empty tail of a
        long cache).
        """
        b, t, d = x.shape
        n, kh, h = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Linear(n * h, ("heads", "embed"), use_bias=True, name="q_proj", **kw)(x)
        k = Linear(kh * h, ("kv_heads", "embed"), use_bias=True, name="k_proj", **kw)(x)
        v = Linear(kh * h, ("kv_heads", "embed"), use_bias=True, name="v_proj", **kw)(x)
        q = checkpoint_name(q, "query_proj").reshape(b, t, n, h)
        k = checkpoint_name(k, "key_proj").reshape(b, t, kh, h)
        v = checkpoint_name(v, "value_proj").reshape(b, t, kh, h)
        cos, sin = rope.cos_sin(positions, h, self.rope_theta, self.dtype)
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))

        kv: KVCache | LayerKV = (k, v)
        if cache is not None:
            kv = cache.update(layer, k, v, positions[:, 0]).constrain()
        if attend_cache:
            if cache is None:
                raise ValueError("attend_cache=True needs a cache")
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) cannot attend over a cache")
            ck, cv = kv.layer(layer)
            k_pos = jnp.arange(ck.shape[1], dtype=jnp.int32)[None, :]
            mask = AttentionMask.make_causal(positions, k_pos)
            out = dot_product_attention(q, ck, cv, mask=mask)
        else:
            impl = None
            if self.causal_by_index:
                if cache is not None:
                    raise ValueError("causal_by_index is for cache-less calls (training rows)")
                mask = AttentionMask.make_causal()
                impl = None if self.implementation == "auto" else self.implementation
            else:
                mask = AttentionMask.make_causal(positions, positions)
            if segment_ids is not None:
                mask = mask & AttentionMask.make_segments(segment_ids)
            out = dot_product_attention(q, k, v, mask=mask, implementation=impl)
        out = out.reshape(b, t, n * h)
        out = Linear(d, ("embed", "heads"), name="o_proj", **kw)(out)
        return checkpoint_name(out, "out_proj"), kv

"""Kimi-Audio's audio front end: GLM-4-Voice discrete tokens, whisper-large-v3 continuous features.

Host side (numpy): load -> 16 kHz mono, 30 s segments, reference padding, centering. Device side
(one jit per (rows, bucket) shape): log-mel + encoder (+ VQ). Segments of different clips are
batched by padding to a bucket length (multiples of 2 s; `plan_batches` picks the batches that
minimise padded work); per-clip results are the same
as one-clip-at-a-time because nothing outside a segment's reference window can reach its valid
frames (causal convs, key-padding mask, frames past the reference excluded from the log-mel max;
the whisper path always uses the full 30 s window).

Public API:
    tok = GlmTokenizer.from_pretrained("glm-4-voice-tokenizer")        # HF folder or Orbax dir
    ids = tok.tokenize(["a.wav", wav16k, (wav44k, 44100)])            # list of int32 [N_i]
    wf = WhisperFeatureExtractor.from_pretrained("whisper-large-v3")
    feats = wf.features(["a.wav", wav16k])                         # list of f32 [N_i, 4 d_model]
    # N_i = ceil(L_i / 1280) in both; the LLM sees ids + kimia_token_offset.
Lower level (tests, debugging): `glm_segments`, `GlmTokenizer.encode_segments(debug=True)` (log-mel,
masks, prequant, distances, ids, last_hidden_state), `WhisperFeatureExtractor.encode_segments`
(full 1500-frame encoder outputs).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kimia_jax.audio import mel as mel_lib
from kimia_jax.audio.io import AudioLike, load_audio, split_segments, token_len
from kimia_jax.configs import WhisperConfig
from kimia_jax.models.whisper_encoder import WhisperEncoder, WhisperVQEncoder

SEGMENT = 480000  # 30 s at 16 kHz
TOKEN_HOP = 1280  # samples per 12.5 Hz token
REF_BATCH = 128  # GLM-4-Voice feature-extracts segments in batches of 128 (spec 3.2)
# Segment lengths in tokens (x 1280 samples = 2 s steps): at most 2 s of padding per segment.
DEFAULT_TOKEN_BUCKETS = tuple(range(25, 376, 25))
# Per-call cost in seconds of padded audio work, for `plan_batches`: small on CPU (padding costs
# compute); raise it on accelerators, where a bigger batch is nearly free.
DEFAULT_CALL_OVERHEAD_S = 1.0


@dataclasses.dataclass(frozen=True)
class Segment:
    """One 30 s cut of one clip, with the padding the reference gives it."""

    clip: int
    samples: np.ndarray  # float32 [L]
    padded_len: int  # reference padded length in samples (GLM path); 480000 on the whisper path

    @property
    def length(self) -> int:
        return len(self.samples)


def glm_segments(wav: np.ndarray, clip: int = 0) -> list[Segment]:
    """One clip's segments with GLM-4-Voice's padding (per 128: longest, rounded up to 1280)."""
    segs = split_segments(wav)
    out = []
    for start in range(0, len(segs), REF_BATCH):
        batch = segs[start : start + REF_BATCH]
        pad = -(-max(len(s) for s in batch) // TOKEN_HOP) * TOKEN_HOP
        out += [Segment(clip, s, pad) for s in batch]
    return out


def _pow2_at_least(n: int, cap: int) -> int:
    b = 1
    while b < n and b < cap:
        b *= 2
    return b


def plan_batches(
    buckets: Sequence[int], max_batch: int, call_overhead: float = 0.0
) -> list[tuple[int, list[int]]]:
    """Splits items into device batches, minimising padded work.

    Items are sorted by bucket length; a batch is a contiguous run of at most `max_batch` items,
    padded to its longest bucket and to a power-of-two row count. Dynamic programming picks the
    runs that minimise sum(rows x bucket) + call_overhead per call (same units as `buckets`).

    Returns:
      [(bucket_len, [item indices])] in execution order.
    """
    order = sorted(range(len(buckets)), key=lambda i: buckets[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n
    prev = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_batch), j):
            cost = (
                best[i] + _pow2_at_least(j - i, max_batch) * buckets[order[j - 1]] + call_overhead
            )
            if cost < best[j]:
                best[j], prev[j] = cost, i
    plan, j = [], n
    while j > 0:
        i = prev[j]
        plan.append((buckets[order[j - 1]], order[i:j]))
        j = i
    return plan[::-1]


def _run_bucketed(
    segments: Sequence[Segment],
    bucket_len: Callable[[Segment], int],
    run: Callable[[np.ndarray, np.ndarray, np.ndarray], Any],
    max_batch: int,
    call_overhead: float = 0.0,
) -> list[Any]:
    """Batches segments (`plan_batches`), runs `run(centered, lengths, n_frames)` on each batch.

    Returns, per segment in input order, the row `i` of every output (a dict of numpy arrays).
    """
    results: list[Any] = [None] * len(segments)
    plan = plan_batches([bucket_len(s) for s in segments], max_batch, call_overhead)
    for blen, chunk in plan:
        b = _pow2_at_least(len(chunk), max_batch)
        centered = np.zeros((b, blen + mel_lib.N_FFT), np.float32)
        lengths = np.zeros((b,), np.int32)
        n_frames = np.ones((b,), np.int32)  # dummy rows: any positive value
        for r, i in enumerate(chunk):
            s = segments[i]
            centered[r] = mel_lib.center_pad(s.samples, s.padded_len, blen)
            lengths[r] = s.length
            n_frames[r] = s.padded_len // mel_lib.HOP
        out = jax.device_get(run(centered, lengths, n_frames))
        for r, i in enumerate(chunk):
            results[i] = {k: v[r] for k, v in out.items()}
    return results


def _load_all(audios: Sequence[AudioLike | tuple[np.ndarray, int]] | AudioLike) -> list[np.ndarray]:
    """Items: a path, a 16 kHz array [L] / [C, L], or an `(array, sample_rate)` tuple."""
    if isinstance(audios, (str, os.PathLike)) or (
        isinstance(audios, np.ndarray) and audios.ndim == 1
    ):
        audios = [audios]
    return [load_audio(*a) if isinstance(a, tuple) else load_audio(a) for a in audios]


# ----------------------------------------------------------------------------------------------
# GLM-4-Voice tokenizer


def _glm_forward(
    params: Any,
    centered: jax.Array,
    lengths: jax.Array,
    n_frames: jax.Array,
    *,
    cfg: WhisperConfig,
    debug: bool,
) -> dict[str, jax.Array]:
    mel = mel_lib.log_mel(centered, n_frames)  # [B, 128, T]
    t = mel.shape[2]
    frame_mask = (jnp.arange(t)[None, :] * mel_lib.HOP < lengths[:, None]).astype(jnp.int32)
    out = WhisperVQEncoder(cfg).apply({"params": params}, mel, frame_mask)
    if not debug:
        return {"ids": out["ids"]}
    return {**out, "input_features": mel, "feature_attention_mask": frame_mask}


class GlmTokenizer:
    """GLM-4-Voice speech tokenizer (12.5 Hz ids in [0, quantize_vocab_size)), batched, jitted."""

    def __init__(
        self,
        cfg: WhisperConfig,
        params: Any,
        *,
        max_batch: int = 8,
        token_buckets: Sequence[int] = DEFAULT_TOKEN_BUCKETS,
        mesh: Mesh | None = None,
        call_overhead_s: float = DEFAULT_CALL_OVERHEAD_S,
    ):
        if not cfg.is_vq:
            raise ValueError(
                "GlmTokenizer needs a WhisperVQ config (quantize_vocab_size is missing)"
            )
        self.cfg, self.params, self.max_batch, self.mesh = cfg, params, max_batch, mesh
        self.call_overhead = call_overhead_s * 16000
        full = SEGMENT // TOKEN_HOP
        self.token_buckets = tuple(sorted({min(b, full) for b in token_buckets} | {full}))
        self._fast = jax.jit(functools.partial(_glm_forward, cfg=cfg, debug=False))
        self._debug = jax.jit(functools.partial(_glm_forward, cfg=cfg, debug=True))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], mesh: Mesh | None = None, **kw: Any
    ) -> GlmTokenizer:
        """From a `glm-4-voice-tokenizer` HF folder or its converted Orbax directory."""
        from kimia_jax.conversion import whisper as conv

        cfg, params = conv.load(path, mesh=mesh, kind="vq")
        return cls(cfg, params, mesh=mesh, **kw)

    def _bucket(self, s: Segment) -> int:
        need = s.padded_len // TOKEN_HOP
        return next(b for b in self.token_buckets if b >= need) * TOKEN_HOP

    def encode_segments(
        self, segments: Sequence[Segment], debug: bool = False
    ) -> list[dict[str, np.ndarray]]:
        """Runs segments through the tokenizer in bucketed batches.

        Returns per segment a dict with `ids` int32 [T/8] (+ with debug: input_features [128, T],
        feature_attention_mask [T], prequant [T/8, D], distances [T/8, V], pooled_valid_mask,
        last_hidden_state), where T is the segment's reference frame count (padded_len / 160).
        """
        fn = self._debug if debug else self._fast
        res = _run_bucketed(
            segments,
            self._bucket,
            lambda c, ln, n: fn(self.params, c, ln, n),
            self.max_batch,
            self.call_overhead,
        )
        out = []
        for s, r in zip(segments, res, strict=True):
            n_tok = s.padded_len // TOKEN_HOP
            cut = {
                k: v[:n_tok]
                for k, v in r.items()
                if k not in ("input_features", "feature_attention_mask")
            }
            if debug:
                cut["input_features"] = r["input_features"][:, : n_tok * 8]
                cut["feature_attention_mask"] = r["feature_attention_mask"][: n_tok * 8]
            out.append(cut)
        return out

    def tokenize(self, audios: Sequence[AudioLike] | AudioLike) -> list[np.ndarray]:
        """Token ids per clip (int32 [ceil(L/1280)], no token offset), as `extract_speech_token`."""
        wavs = _load_all(audios)
        segs = [s for c, w in enumerate(wavs) for s in glm_segments(w, c)]
        res = self.encode_segments(segs)
        per_clip: list[list[np.ndarray]] = [[] for _ in wavs]
        for s, r in zip(segs, res, strict=True):
            per_clip[s.clip].append(r["ids"][: token_len(s.length)])
        return [np.concatenate(p).astype(np.int32) for p in per_clip]


# ----------------------------------------------------------------------------------------------
# whisper-large-v3 continuous features


def _whisper_forward(
    params: Any, centered: jax.Array, lengths: jax.Array, n_frames: jax.Array, *, cfg: WhisperConfig
) -> dict[str, jax.Array]:
    del lengths  # the whisper path has no mask: full 30 s window (spec 5.2)
    mel = mel_lib.log_mel(centered, n_frames)  # [B, 128, 3000]
    return {"encoder_full": WhisperEncoder(cfg).apply({"params": params}, mel)}


class WhisperFeatureExtractor:
    """whisper-large-v3 encoder features at 12.5 Hz: 4 consecutive 50 Hz frames concatenated."""

    def __init__(
        self, cfg: WhisperConfig, params: Any, *, max_batch: int = 8, mesh: Mesh | None = None
    ):
        if cfg.is_vq:
            raise ValueError(
                "WhisperFeatureExtractor needs a plain whisper config, got a VQ tokenizer"
            )
        self.cfg, self.params, self.max_batch, self.mesh = cfg, params, max_batch, mesh
        self._fn = jax.jit(functools.partial(_whisper_forward, cfg=cfg))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        mesh: Mesh | None = None,
        dtype: str = "float32",
        **kw: Any,
    ) -> WhisperFeatureExtractor:
        """From a `whisper-large-v3` HF folder or its converted Orbax directory.

        dtype "bfloat16" runs the encoder in bf16 as the official runtime does (spec 5.4).
        """
        from kimia_jax.conversion import whisper as conv

        cfg, params = conv.load(path, mesh=mesh, dtype=dtype, kind="whisper")
        return cls(cfg, params, mesh=mesh, **kw)

    def encode_segments(self, segments: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Full-window encoder outputs `[1500, D]` per segment (encoder_full_seg{k})."""
        segs = [Segment(0, s, SEGMENT) for s in segments]
        res = _run_bucketed(
            segs,
            lambda s: SEGMENT,
            lambda c, ln, n: self._fn(self.params, c, ln, n),
            self.max_batch,
        )
        return [r["encoder_full"] for r in res]

    def features(self, audios: Sequence[AudioLike] | AudioLike) -> list[np.ndarray]:
        """float32 `[N, 4 d_model]` per clip, N = ceil(L/1280) (equal to the GLM token count)."""
        wavs = _load_all(audios)
        segs = [(c, s) for c, w in enumerate(wavs) for s in split_segments(w)]
        full = self.encode_segments([s for _, s in segs])
        per_clip: list[list[np.ndarray]] = [[] for _ in wavs]
        for (c, s), h in zip(segs, full, strict=True):
            per_clip[c].append(h[: 4 * token_len(len(s))])
        d = self.cfg.d_model
        return [np.concatenate(p).reshape(-1, 4 * d) for p in per_clip]

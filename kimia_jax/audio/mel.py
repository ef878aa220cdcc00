"""Whisper log-mel spectrogram in JAX (spec section 3), for both the GLM-4 and the whisper path.

The host prepares a *centered* waveform per example: the reference-padded segment (zeros to
`L_pad`) with 200 reflected samples on each side (torch.stft `center=True`, reflect), then extra
zeros up to a common bucket length. Everything else (framing, periodic Hann, |rfft|^2, slaney mel,
log10, per-example max - 8 clamp, affine) runs inside the caller's jit. Frames at or beyond the
reference frame count `n_frames = L_pad / 160` are computed but excluded from the clamp max, so a
bucket-padded example gives the reference values on its first `n_frames` frames.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

N_FFT = 400
HOP = 160
N_MELS = 128
SAMPLE_RATE = 16000


@functools.cache
def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """Slaney mel filterbank `[n_mels, 201]` float32, as Whisper's `mel_filters.npz`.

    Whisper generated its npz with `librosa.filters.mel(sr=16000, n_fft=400, n_mels=128)` (float64
    computation cast to float32); the GLM path's transformers `mel_filter_bank` agrees to 4e-9.
    """
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels).astype(np.float32)


def center_pad(segment: np.ndarray, padded_len: int, total_len: int | None = None) -> np.ndarray:
    """Host side: zero-pad to `padded_len`, reflect-pad 200 each side, zero-extend.

    Args:
      segment: float32 `[L]`, L <= padded_len.
      padded_len: the reference padding (multiple of 160; > 200).
      total_len: bucket length (>= padded_len); defaults to padded_len.
    Returns:
      float32 `[total_len + 400]`.
    """
    total_len = padded_len if total_len is None else total_len
    if not len(segment) <= padded_len <= total_len:
        raise ValueError(
            f"need L={len(segment)} <= padded_len={padded_len} <= total_len={total_len}"
        )
    x = np.zeros(padded_len, np.float32)
    x[: len(segment)] = segment
    c = np.pad(x, N_FFT // 2, mode="reflect")
    if total_len > padded_len:
        c = np.concatenate([c, np.zeros(total_len - padded_len, np.float32)])
    return c


def log_mel(
    centered: jax.Array, n_frames: jax.Array, filters: np.ndarray | None = None
) -> jax.Array:
    """Log-mel of centered waveforms.

    Args:
      centered: float32 `[B, 160 T + 400]` from `center_pad`.
      n_frames: int32 `[B]`, reference frame count per example (frames beyond are excluded from the
        clamp max; their values are not meaningful).
      filters: `[n_mels, 201]`, default `mel_filters()`.
    Returns:
      float32 `[B, n_mels, T]`.
    """
    filters = mel_filters() if filters is None else filters
    b, lc = centered.shape
    t = (lc - N_FFT) // HOP
    # Frame t = samples [160 t, 160 t + 400) = chunks t, t+1 and the first 80 samples of chunk t+2.
    chunks = centered[:, : HOP * (t + 2)].reshape(b, t + 2, HOP)
    frames = jnp.concatenate(
        [chunks[:, :t], chunks[:, 1 : t + 1], chunks[:, 2 : t + 2, : N_FFT - 2 * HOP]], axis=-1
    )  # [B, T, 400]
    n = np.arange(N_FFT)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)).astype(np.float32)  # periodic Hann
    spec = jnp.fft.rfft(frames * window, axis=-1)  # [B, T, 201]
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    mel = jnp.einsum(
        "mf,btf->bmt", jnp.asarray(filters), power, precision=jax.lax.Precision.HIGHEST
    )
    s = jnp.log10(jnp.maximum(mel, 1e-10))
    valid = jnp.arange(t)[None, None, :] < n_frames[:, None, None]
    peak = jnp.max(jnp.where(valid, s, -jnp.inf), axis=(1, 2), keepdims=True)
    s = jnp.maximum(s, peak - 8.0)
    return (s + 4.0) / 4.0

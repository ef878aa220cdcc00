"""BigVGAN's log-mel of a 24 kHz waveform (`get_melspec`, spec/detokenizer.md §5.7): the mel of a
voice prompt, which conditions the DiT through `Detokenizer.prefill`.

Host-side numpy (one clip per prompt, computed once): reflect padding of (n_fft - hop) / 2 on
each side, periodic Hann window of `win_size` (centred in n_fft), STFT without centring,
magnitude sqrt(re^2 + im^2 + 1e-9), librosa's slaney mel filterbank, log(max(., 1e-5)).
"""

from __future__ import annotations

import functools

import numpy as np

from kimia_jax.configs import BigVGANConfig


@functools.cache
def _filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)


def mel_spectrogram(wav: np.ndarray, cfg: BigVGANConfig) -> np.ndarray:
    """float32 wav [S] at cfg.sampling_rate -> float32 log-mel [T, num_mels],
    T = (S + 2 pad - n_fft) // hop + 1 with pad = (n_fft - hop) // 2."""
    wav = np.asarray(wav, np.float32).reshape(-1)
    n_fft, hop, win = cfg.n_fft, cfg.hop, cfg.win_size
    pad = (n_fft - hop) // 2
    if wav.size <= pad:
        raise ValueError(
            f"voice prompt of {wav.size} samples is too short for the mel ({pad + 1}+ needed)"
        )
    y = np.pad(wav, (pad, pad), mode="reflect")
    n_frames = (len(y) - n_fft) // hop + 1
    if n_frames < 1:
        raise ValueError(f"voice prompt of {wav.size} samples gives no mel frame")
    window = np.zeros(n_fft, np.float64)
    left = (n_fft - win) // 2  # torch.stft centres a shorter window in n_fft
    window[left : left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    idx = np.arange(n_fft)[None] + hop * np.arange(n_frames)[:, None]
    spec = np.fft.rfft(y[idx].astype(np.float64) * window, axis=-1)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    fb = _filters(cfg.sampling_rate, n_fft, cfg.num_mels, cfg.fmin, cfg.fmax)
    mel = mag @ fb.T.astype(np.float64)
    return np.log(np.maximum(mel, 1e-5)).astype(np.float32)

"""Atomic wav writing (temp file in the destination folder, then rename)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kimia_jax import fileio


def write_wav(
    path: str | os.PathLike[str], wav: np.ndarray, sample_rate: int = 24000, subtype: str = "PCM_16"
) -> Path:
    """Writes a mono float waveform in [-1, 1] to `path` atomically; returns the path.

    A reader never sees a half-written file: the data goes to a staging file next to `path`
    which is renamed over it only once complete; the file gets the umask's permissions.
    """
    import soundfile as sf

    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2 and 1 in wav.shape:
        wav = wav.reshape(-1)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"write_wav expects a non-empty mono waveform, got shape {wav.shape}")
    if not np.isfinite(wav).all():
        raise ValueError("write_wav: waveform contains NaN or inf")
    path = Path(path)
    with fileio.atomic_file(path) as f:
        sf.write(f, wav, sample_rate, subtype=subtype, format="WAV")
    return path

"""Audio input: any file or array -> 16 kHz mono float32, exactly as the official pipeline loads it.

Kimi-Audio loads every clip with `librosa.load(path, sr=16000)` (spec section 1): soundfile decoding
(PCM scaled by full scale, no normalisation), channels averaged first, then soxr "HQ" resampling
when
the file rate is not 16 kHz; a 16 kHz file is returned untouched. We call librosa itself so that
tokens on resampled audio stay exact. Arrays go through the same two steps (`librosa.to_mono`,
`librosa.resample(res_type="soxr_hq")`). Host-side numpy, as in the reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from kimia_jax.errors import AudioError  # noqa: F401 (re-export)

SAMPLE_RATE = 16000

AudioLike = Union[str, os.PathLike, np.ndarray]  # noqa: UP007 - used at runtime in isinstance


def _check_samples(wav: np.ndarray, what: str) -> np.ndarray:
    if wav.size == 0:
        raise AudioError(f"{what}: zero-length audio (0 samples)")
    bad = ~np.isfinite(wav)
    if bad.any():
        first = int(np.argmax(bad.reshape(-1)))
        raise AudioError(
            f"{what}: audio contains {int(bad.sum())} NaN or inf sample(s) "
            f"(first at flat index {first})"
        )
    return wav


def _to_mono_16k(wav: np.ndarray, sr: int, what: str) -> np.ndarray:
    import librosa

    if wav.ndim == 2:
        # librosa convention [channels, samples]; channels are averaged before resampling.
        wav = librosa.to_mono(wav)
    if sr != SAMPLE_RATE:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    return _check_samples(np.ascontiguousarray(wav, dtype=np.float32), what)


def load_audio(audio: AudioLike, sr: int | None = None) -> np.ndarray:
    """Loads one clip as 16 kHz mono float32, with `librosa.load(path, sr=16000)` semantics.

    Args:
      audio: a path (wav/flac/mp3/ogg/... anything soundfile or audioread decodes), or a float array
        `[L]` or `[C, L]` (channels first, as librosa), values in [-1, 1] (integer arrays are
        scaled by their full scale, e.g. int16 / 32768).
      sr: sample rate of an array input (default 16000). Must not be given for a path (the file
        header says it).

    Returns:
      float32 `[L16]` at 16 kHz. Digital silence is valid.

    Raises:
      FileNotFoundError: the path does not exist.
      AudioError: the file cannot be decoded, or the audio is empty or has NaN/inf samples.
    """
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if sr is not None:
            raise ValueError(f"{path}: sr= is only for array inputs (a file carries its own rate)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{path}: file is empty (0 bytes)")
        # librosa.load decodes with soundfile, averages channels, then resamples; we do the same
        # steps (bit-identical, tested) so NaN/inf can be reported before librosa trips on them.
        import soundfile as sf

        try:
            # exactly librosa's read call (sf.read decodes mp3 differently by ~6e-8)
            with sf.SoundFile(str(path)) as f:
                rate = f.samplerate
                pcm = f.read(frames=-1, dtype="float32", always_2d=False).T  # [L] or [C, L]
        except Exception:  # not a libsndfile format (e.g. m4a): librosa falls back to audioread
            import librosa

            try:
                wav, _ = librosa.load(str(path), sr=SAMPLE_RATE)
            except Exception as e:  # soundfile / audioread errors do not name the file
                raise AudioError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from e
            return _check_samples(np.ascontiguousarray(wav, dtype=np.float32), str(path))
        pcm = _check_samples(pcm, str(path))
        return _to_mono_16k(pcm, rate, str(path))

    wav = np.asarray(audio)
    what = f"array of shape {wav.shape}"
    if wav.ndim not in (1, 2):
        raise AudioError(f"{what}: expected [samples] or [channels, samples]")
    if wav.ndim == 2 and wav.shape[0] > wav.shape[1]:
        raise AudioError(f"{what}: expected [channels, samples] (channels first); transpose it")
    if np.issubdtype(wav.dtype, np.integer):
        wav = wav.astype(np.float32) / float(-np.iinfo(wav.dtype).min)
    elif not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(f"{what}: dtype {wav.dtype} is not a float or integer audio dtype")
    wav = _check_samples(wav.astype(np.float32, copy=False), what)
    rate = SAMPLE_RATE if sr is None else int(sr)
    if rate <= 0:
        raise AudioError(f"{what}: sample rate must be positive, got {sr}")
    return _to_mono_16k(wav, rate, what)


def split_segments(wav: np.ndarray, segment: int = 30 * SAMPLE_RATE) -> list[np.ndarray]:
    """Hard, non-overlapping 30 s cuts (spec section 2): `wav[480000 k : 480000 (k+1)]`."""
    return [wav[i : i + segment] for i in range(0, len(wav), segment)]


def token_len(num_samples: int, hop: int = 1280) -> int:
    """Tokens of one segment: ceil(L / 1280) (12.5 Hz)."""
    return (num_samples - 1) // hop + 1

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

AudioLike = Union[str, os.PathLike, np.ndarray, tuple]  # noqa: UP007 - used at runtime in isinstance
"""A path, a waveform array (16 kHz unless `sr=` says so) or an `(array, sample_rate)` tuple."""

MAX_CHANNELS = 16  # a 2-D array with more rows and columns than this is not a multi-channel clip


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


def _to_mono_16k(wav: np.ndarray, sr: int, what: str, target: int = SAMPLE_RATE) -> np.ndarray:
    import librosa

    if wav.ndim == 2:
        # librosa convention [channels, samples]; channels are averaged before resampling.
        wav = librosa.to_mono(wav)
    if sr != target:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=target, res_type="soxr_hq")
    return _check_samples(np.ascontiguousarray(wav, dtype=np.float32), what)


def load_audio(
    audio: AudioLike, sr: int | None = None, *, target_sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Loads one clip as 16 kHz mono float32, with `librosa.load(path, sr=16000)` semantics.

    Args:
      audio: a path (wav/flac/mp3/ogg/... anything soundfile or audioread decodes), an array, or an
        `(array, sample_rate)` tuple. Arrays may be `[L]`, `[C, L]` (channels first, as librosa) or
        `[L, C]` (channels last, as soundfile returns them; the channel axis is the one of at most
        16 entries), float in [-1, 1] or integer PCM scaled by its full scale (int16 / 32768,
        int32 / 2^31, uint8 centred on 128), as soundfile decodes files.
      sr: sample rate of an array input (default 16000). Must not be given for a path (the file
        header says it) nor together with a tuple.
      target_sr: the rate returned (16000; the detokenizer's voice prompt asks for 24000, as
        `librosa.load(path, sr=24000)`).

    Returns:
      float32 `[L]` at `target_sr`. Digital silence is valid.

    Raises:
      FileNotFoundError: the path does not exist.
      IsADirectoryError: the path is a folder.
      AudioError: the file cannot be decoded, or the audio is empty or has NaN/inf samples.
    """
    if isinstance(audio, tuple):
        if len(audio) != 2:
            raise AudioError(f"an audio tuple must be (array, sample_rate), got {len(audio)} items")
        if sr is not None:
            raise ValueError(
                "give the sample rate either in the (array, sample_rate) tuple or as sr="
            )
        audio, sr = audio
        if isinstance(audio, (str, os.PathLike)):
            raise AudioError(
                f"{audio}: (path, sample_rate) is not accepted; a file carries its rate"
            )
        if isinstance(sr, bool) or not isinstance(sr, (int, np.integer, float)) or sr != int(sr):
            raise AudioError(f"sample rate must be a positive integer in Hz, got {sr!r}")
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if sr is not None:
            raise ValueError(f"{path}: sr= is only for array inputs (a file carries its own rate)")
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a folder, not an audio file")
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
                wav, _ = librosa.load(str(path), sr=target_sr)
            except Exception as e:  # soundfile / audioread errors do not name the file
                raise AudioError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from e
            return _check_samples(np.ascontiguousarray(wav, dtype=np.float32), str(path))
        pcm = _check_samples(pcm, str(path))
        return _to_mono_16k(pcm, rate, str(path), target_sr)

    if not isinstance(audio, np.ndarray) and not hasattr(audio, "__array__"):
        raise AudioError(
            f"audio must be a path, an array or an (array, sample_rate) tuple, "
            f"got {type(audio).__name__}"
        )
    wav = np.asarray(audio)
    what = f"array of shape {wav.shape}"
    if wav.ndim not in (1, 2):
        raise AudioError(f"{what}: expected [samples], [channels, samples] or [samples, channels]")
    if wav.ndim == 2:
        if min(wav.shape) > MAX_CHANNELS:
            raise AudioError(
                f"{what}: neither axis looks like channels (at most {MAX_CHANNELS}); "
                "pass [samples], [channels, samples] or [samples, channels]"
            )
        if wav.shape[0] > wav.shape[1]:
            wav = wav.T  # [samples, channels] (soundfile's layout) -> channels first
    if wav.dtype == np.bool_:
        raise AudioError(f"{what}: dtype bool is not an audio dtype")
    if np.issubdtype(wav.dtype, np.unsignedinteger):
        half = float(np.iinfo(wav.dtype).max // 2 + 1)  # uint8 PCM: 128 is silence
        wav = (wav.astype(np.float64) - half).astype(np.float32) / np.float32(half)
    elif np.issubdtype(wav.dtype, np.integer):
        wav = wav.astype(np.float32) / float(-np.iinfo(wav.dtype).min)
    elif not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(f"{what}: dtype {wav.dtype} is not a float or integer audio dtype")
    wav = _check_samples(wav.astype(np.float32, copy=False), what)
    rate = SAMPLE_RATE if sr is None else int(sr)
    if rate <= 0 or (sr is not None and sr != rate):
        raise AudioError(f"{what}: sample rate must be positive, got {sr}")
    return _to_mono_16k(wav, rate, what, target_sr)


def split_segments(wav: np.ndarray, segment: int = 30 * SAMPLE_RATE) -> list[np.ndarray]:
    """Hard, non-overlapping 30 s cuts (spec section 2): `wav[480000 k : 480000 (k+1)]`."""
    return [wav[i : i + segment] for i in range(0, len(wav), segment)]


def token_len(num_samples: int, hop: int = 1280) -> int:
    """Tokens of one segment: ceil(L / 1280) (12.5 Hz)."""
    return (num_samples - 1) // hop + 1

"""Waveform stitching of streamed vocoder outputs (spec/detokenizer.md §4.4), host-side numpy.

Each chunk re-vocodes the tail of the previous chunk's mel with new right context, and the overlap
is cross-faded with the two halves of a *periodic* Hamming window. The halves sum to 1.08, not 1:
that is the official behaviour and is reproduced, not fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def hamming_periodic(n: int) -> np.ndarray:
    """torch.hamming_window(n, periodic=True) in float32: 0.54 - 0.46 cos(2 pi k / n)."""
    if n <= 0:
        return np.zeros((0,), np.float32)
    k = np.arange(n, dtype=np.float32)
    # torch: arange * float32(2 pi / (N - 1)) with N = n + 1 (periodic), cos, * -beta, + alpha.
    ang = k * np.float32(2.0 * np.pi / n)
    return (np.cos(ang) * np.float32(-0.46) + np.float32(0.54)).astype(np.float32)


class WaveStitcher:
    """Turns per-chunk mels [T, M] into waveform pieces whose concatenation is the utterance.

    Args:
      decode: vocoder, mel [T, M] float32 -> wav [T * frame_size] float32.
      frame_size: samples per mel frame (480 at 24 kHz).
    """

    def __init__(self, decode: Callable[[np.ndarray], np.ndarray], frame_size: int = 480):
        self.decode = decode
        self.frame_size = frame_size
        self.pre_mel: np.ndarray | None = None
        self.pre_wav: np.ndarray | None = None

    def reset(self) -> None:
        self.pre_mel = None
        self.pre_wav = None

    def push(self, mel: np.ndarray, is_final: bool) -> np.ndarray:
        """Vocodes one chunk's mel (with the carried overlap) and returns the samples now final."""
        f = self.frame_size
        if self.pre_mel is None:
            wav = self.decode(mel)
            if is_final:
                self.reset()
                return wav
            n = mel.shape[0]
            out = wav[: f * n // 2]
            self.pre_wav = wav[-f * n // 2 :]
            # Python's -n//2 is floor(-n/2): for odd n pre_mel gets ceil(n/2) frames (spec §4.4).
            self.pre_mel = mel[-n // 2 :]
            return out
        wav = self.decode(np.concatenate([self.pre_mel, mel], axis=0))
        if is_final:
            self.reset()
            return wav
        p = len(self.pre_wav)
        g = 2 * p if len(wav) > 2 * p else len(wav) // 2
        h = g // 2
        win = hamming_periodic(g)
        out = wav[:g].copy()
        out[:h] = self.pre_wav[:h] * win[g - h :] + wav[:h] * win[:h]
        r = len(wav) - g
        self.pre_wav = wav[-r:]
        self.pre_mel = mel[-(r // f) :]  # from this chunk's mel only; [-0:] would keep all of it
        return out

"""Waveform stitching of streamed vocoder outputs (spec/detokenizer.md §4.4), host-side numpy.

Each chunk re-vocodes the tail of the previous chunk's mel with new right context, and the overlap
is cross-faded with the two halves of a *periodic* Hamming window. The halves sum to 1.08, not 1:
that is the official behaviour and is reproduced, not fixed.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class StitchState:
    """What stitching carries from one chunk to the next: the previous chunk's mel tail (vocoded
    again with the new chunk) and waveform tail (cross-faded). Empty at an utterance start."""

    pre_mel: np.ndarray | None = None
    pre_wav: np.ndarray | None = None


def stitch(
    decode: Callable[[np.ndarray], np.ndarray],
    frame_size: int,
    state: StitchState,
    mel: np.ndarray,
    is_final: bool,
) -> tuple[np.ndarray, StitchState]:
    """Vocodes one chunk's mel (with the carried overlap); returns (the samples now final, the
    state for the next chunk). A pure function of its inputs (`decode`: mel [T, M] -> wav
    [T * frame_size]); concatenating the pieces of an utterance gives the whole waveform.
    """
    f = frame_size
    if state.pre_mel is None:
        wav = decode(mel)
        if is_final:
            return wav, StitchState()
        n = mel.shape[0]
        # Python's -n//2 is floor(-n/2): for odd n pre_mel gets ceil(n/2) frames (spec §4.4).
        return wav[: f * n // 2], StitchState(pre_mel=mel[-n // 2 :], pre_wav=wav[-f * n // 2 :])
    wav = decode(np.concatenate([state.pre_mel, mel], axis=0))
    if is_final:
        return wav, StitchState()
    p = len(state.pre_wav)
    g = 2 * p if len(wav) > 2 * p else len(wav) // 2
    h = g // 2
    win = hamming_periodic(g)
    out = wav[:g].copy()
    out[:h] = state.pre_wav[:h] * win[g - h :] + wav[:h] * win[:h]
    r = len(wav) - g
    # pre_mel from this chunk's mel only; [-0:] would keep all of it
    return out, StitchState(pre_mel=mel[-(r // f) :], pre_wav=wav[-r:])

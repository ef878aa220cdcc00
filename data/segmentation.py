"""Segmentation of long recordings with the report's merge and split rules (training.md §1.2 E).

With diarization (a diarization stage gives speaker turns), regions are the speaker turns. Without
it, regions come from an energy VAD (documented here, no model):

* frame energy: RMS of 25 ms frames every 10 ms, in dBFS;
* a frame is speech when its energy is above max(`floor_db` (-50 dBFS), loudest frame - `range_db`
  (35 dB)) — i.e. relative to the recording's own level, with an absolute floor for digital
  silence;
* silences shorter than `min_silence_s` (0.3 s) are bridged; speech runs shorter than
  `min_speech_s` (0.2 s) are dropped; every region is widened by `pad_s` (0.1 s) each side.

Then the report's rules [R §3.1 p.7]: adjacent regions of the same speaker are merged iteratively
while the merged region stays <= `max_s` (27 s) and the silence between them is <= `max_gap_s`
(2 s); a region longer than 27 s (the report does not say what happens to those; spec §1.2
proposal) is split at its quietest frame in the last half of the 27 s window, repeatedly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SR = 16000
FRAME = 400  # 25 ms
HOP = 160  # 10 ms


@dataclasses.dataclass(frozen=True)
class Region:
    start: int  # samples at 16 kHz
    end: int
    speaker: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    max_s: float = 27.0
    max_gap_s: float = 2.0
    min_segment_s: float = 1.0
    floor_db: float = -50.0
    range_db: float = 35.0
    min_silence_s: float = 0.3
    min_speech_s: float = 0.2
    pad_s: float = 0.1


def frame_db(wav: np.ndarray) -> np.ndarray:
    """RMS energy in dBFS of 25 ms frames every 10 ms (frame k covers [k*HOP, k*HOP + FRAME))."""
    n = max(1, (len(wav) - FRAME) // HOP + 1) if len(wav) >= FRAME else 1
    x = np.zeros(max(len(wav), FRAME), np.float64)
    x[: len(wav)] = wav
    idx = np.arange(n)[:, None] * HOP + np.arange(FRAME)[None, :]
    rms = np.sqrt(np.mean(x[idx] ** 2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-10))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def energy_regions(wav: np.ndarray, cfg: SegmentationConfig = SegmentationConfig()) -> list[Region]:
    """Speech regions of a 16 kHz recording by the energy VAD of the module docstring."""
    db = frame_db(wav)
    thr = max(cfg.floor_db, float(db.max()) - cfg.range_db)
    speech = db > thr
    gap = int(round(cfg.min_silence_s * SR / HOP))
    for s, e in _runs(~speech):  # bridge short silences (not at the edges)
        if s > 0 and e < len(speech) and e - s < gap:
            speech[s:e] = True
    min_run = int(round(cfg.min_speech_s * SR / HOP))
    pad = int(round(cfg.pad_s * SR))
    out = []
    for s, e in _runs(speech):
        if e - s < min_run:
            continue
        a = max(0, s * HOP - pad)
        b = min(len(wav), (e - 1) * HOP + FRAME + pad)
        if out and a <= out[-1].end:  # padding made them touch
            out[-1] = Region(out[-1].start, b)
        else:
            out.append(Region(a, b))
    return out


def merge_regions(
    regions: Sequence[Region], cfg: SegmentationConfig = SegmentationConfig()
) -> list[Region]:
    """Report rule E: merge adjacent same-speaker regions while <= max_s and gap <= max_gap_s."""
    max_len, max_gap = int(cfg.max_s * SR), int(cfg.max_gap_s * SR)
    out: list[Region] = []
    for r in sorted(regions, key=lambda r: (r.start, r.end)):
        if out:
            p = out[-1]
            if p.speaker == r.speaker and r.start - p.end <= max_gap and r.end - p.start <= max_len:
                out[-1] = Region(p.start, max(p.end, r.end), p.speaker)
                continue
        out.append(r)
    return out


def split_long(
    wav: np.ndarray, region: Region, cfg: SegmentationConfig = SegmentationConfig()
) -> list[Region]:
    """Splits a region longer than max_s at its quietest 10 ms frame in (max_s/2, max_s]."""
    max_len = int(cfg.max_s * SR)
    out, start = [], region.start
    while region.end - start > max_len:
        lo, hi = start + max_len // 2, start + max_len
        db = frame_db(wav[lo:hi])
        cut = lo + int(np.argmin(db)) * HOP + FRAME // 2
        cut = min(max(cut, lo + 1), hi)
        out.append(Region(start, cut, region.speaker))
        start = cut
    out.append(Region(start, region.end, region.speaker))
    return out


def segment_recording(
    wav: np.ndarray,
    turns: Sequence[Region] | None = None,
    cfg: SegmentationConfig = SegmentationConfig(),
) -> tuple[list[Region], int]:
    """Final segments of a recording (speaker `turns` from diarization, else the energy VAD),
    and how many were dropped for being shorter than min_segment_s."""
    regions = list(turns) if turns is not None else energy_regions(wav, cfg)
    merged = merge_regions(regions, cfg)
    pieces = [p for r in merged for p in split_long(wav, r, cfg)]
    keep = [p for p in pieces if p.length >= cfg.min_segment_s * SR]
    return keep, len(pieces) - len(keep)

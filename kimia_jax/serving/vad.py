"""Energy voice-activity detection for the real-time endpoint: decides when the user's turn ends.

Frames of `frame_ms` are speech when their RMS level is above `threshold_db` (dBFS). A turn starts
with `min_speech_ms` of speech frames and ends after `silence_ms` of non-speech frames; the turn's
audio keeps `preroll_ms` before the first speech frame. Pure numpy, fed chunk by chunk.

`onset` says whether the last `push` started a turn (speech onset: the real-time endpoint's
barge-in interrupts a running reply on it).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class VadConfig:
    sample_rate: int = 16000
    frame_ms: int = 30
    threshold_db: float = -40.0
    min_speech_ms: int = 90
    silence_ms: int = 600
    preroll_ms: int = 300
    max_turn_s: float = 30.0

    def __post_init__(self) -> None:
        if not 8000 <= self.sample_rate <= 96000:
            raise ValueError(f"sample_rate must be in [8000, 96000], got {self.sample_rate}")
        for name in ("frame_ms", "min_speech_ms", "silence_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.preroll_ms < 0 or not self.max_turn_s > 0:
            raise ValueError("preroll_ms must be >= 0 and max_turn_s > 0")
        if not -120 <= self.threshold_db <= 0:
            raise ValueError(f"threshold_db must be in [-120, 0] dBFS, got {self.threshold_db}")

    @property
    def frame(self) -> int:
        return self.sample_rate * self.frame_ms // 1000


def level_db(frame: np.ndarray) -> float:
    """RMS level of a frame in dBFS (full scale 1.0)."""
    rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64)))) if frame.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


class EnergyVad:
    """Feed float32 chunks with `push`; it returns the turn's audio when the turn has ended."""

    def __init__(self, config: VadConfig | None = None):
        self.config = config or VadConfig()
        self.onset = False  # the last `push` started a turn
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros((0,), np.float32)  # samples not yet framed
        self._frames: list[np.ndarray] = []  # the turn so far (pre-roll included)
        self._speech = 0  # consecutive speech frames before the turn started
        self._silence = 0  # consecutive silent frames since the last speech frame
        self.in_turn = False

    def _frames_for(self, ms: int) -> int:
        return max(1, -(-ms // self.config.frame_ms))

    def push(self, samples: np.ndarray) -> np.ndarray | None:
        """Adds samples; returns the whole turn when its end was just detected, else None.
        Sets `onset` when these samples started a turn (whether or not it also ended)."""
        c = self.config
        self.onset = False
        self._buf = np.concatenate([self._buf, np.asarray(samples, np.float32).reshape(-1)])
        n = c.frame
        while self._buf.size >= n:
            frame, self._buf = self._buf[:n], self._buf[n:]
            speech = level_db(frame) > c.threshold_db
            self._frames.append(frame)
            if not self.in_turn:
                self._speech = self._speech + 1 if speech else 0
                keep = self._frames_for(c.preroll_ms) + self._speech
                self._frames = self._frames[-keep:]
                if self._speech >= self._frames_for(c.min_speech_ms):
                    self.in_turn, self._silence, self.onset = True, 0, True
                continue
            self._silence = 0 if speech else self._silence + 1
            too_long = len(self._frames) * c.frame_ms >= c.max_turn_s * 1000
            if self._silence >= self._frames_for(c.silence_ms) or too_long:
                turn, rest = np.concatenate(self._frames), self._buf
                self.reset()
                self._buf = rest  # the samples after the turn start the next one
                return turn
        return None

    def end(self) -> np.ndarray | None:
        """Ends the turn now (push-to-talk release): its audio, or None if no speech started."""
        turn = np.concatenate(self._frames + [self._buf]) if self.in_turn else None
        self.reset()
        return turn

"""Energy VAD: when a turn starts and ends, what audio it keeps, bad settings."""

import numpy as np
import pytest

from kimia_jax.serving.vad import EnergyVad, VadConfig, level_db

SR = 16000


def _tone(seconds, amp=0.3):
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * 200 * t)).astype(np.float32)


def test_level_db():
    assert level_db(np.ones(480, np.float32)) == pytest.approx(0.0, abs=1e-6)
    assert level_db(np.full(480, 0.01, np.float32)) == pytest.approx(-40.0, abs=1e-4)
    assert level_db(np.zeros(480, np.float32)) == pytest.approx(-200.0)


def test_turn_ends_after_the_silence_and_keeps_the_preroll():
    """0.5 s silence, 1 s tone, silence fed in 100 ms chunks: the turn ends once 600 ms of
    silence followed the speech (not before), and holds the signal from 300 ms (10 frames of
    30 ms) before the first speech frame through the silence that ended it."""
    vad = EnergyVad(VadConfig(silence_ms=600, preroll_ms=300))
    signal = np.concatenate([np.zeros(SR // 2, np.float32), _tone(1.0), np.zeros(SR, np.float32)])
    fed, turn = 0, None
    for i in range(0, signal.size, SR // 10):
        turn = vad.push(signal[i : i + SR // 10])
        fed = i + SR // 10
        if turn is not None:
            break
    assert turn is not None
    assert 1.5 * SR + 0.6 * SR <= fed <= 1.5 * SR + 0.8 * SR
    # the tone starts inside frame 16 (samples 7680..8159), the first speech frame; the turn
    # starts 10 frames (300 ms) before it, at sample 2880 of the signal
    assert np.array_equal(turn, signal[2880 : 2880 + turn.size])
    assert turn.size >= (8000 - 2880) + SR + int(0.6 * SR) - 480
    assert not vad.in_turn  # ready for the next turn


def test_quiet_noise_is_not_a_turn_and_end_without_speech_is_none():
    vad = EnergyVad(VadConfig(threshold_db=-40))
    rng = np.random.default_rng(0)
    assert vad.push(0.001 * rng.standard_normal(3 * SR).astype(np.float32)) is None
    assert not vad.in_turn and vad.end() is None


def test_push_to_talk_end_returns_the_turn_so_far():
    vad = EnergyVad()
    assert vad.push(_tone(0.5)) is None and vad.in_turn
    turn = vad.end()
    assert turn is not None and turn.size >= 0.45 * SR


def test_long_speech_is_cut_at_max_turn():
    vad = EnergyVad(VadConfig(max_turn_s=1.0))
    turn = vad.push(_tone(3.0))
    assert turn is not None and turn.size == pytest.approx(SR, abs=960)


@pytest.mark.parametrize(
    "kw,word",
    [
        ({"sample_rate": 100}, "sample_rate"),
        ({"silence_ms": 0}, "silence_ms"),
        ({"threshold_db": 3}, "threshold_db"),
    ],
)
def test_bad_settings_are_named(kw, word):
    with pytest.raises(ValueError, match=word):
        VadConfig(**kw)


def test_onset_marks_the_push_that_starts_a_turn():
    """100 ms chunks of silence then tone: `onset` is set by exactly one push, the one in which
    min_speech_ms (90 ms = 3 frames) of speech has accumulated, and not again during the turn."""
    vad = EnergyVad(VadConfig(min_speech_ms=90, silence_ms=600))
    signal = np.concatenate([np.zeros(SR // 2, np.float32), _tone(1.0), np.zeros(SR, np.float32)])
    onsets, ended = [], None
    for k, i in enumerate(range(0, signal.size, SR // 10)):
        if vad.push(signal[i : i + SR // 10]) is not None:
            ended = k
            break
        onsets.append(vad.onset)
    # the tone starts at 0.5 s (chunk 5); 3 speech frames of 30 ms end at 0.59 s, inside chunk 5
    assert [k for k, o in enumerate(onsets) if o] == [5]
    assert ended is not None and ended > 5 and not vad.onset
    assert vad.push(np.zeros(480, np.float32)) is None and not vad.onset

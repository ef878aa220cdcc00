"""Audio loading: librosa.load(sr=16000) semantics, arrays, and clear errors on bad input."""

import re

import librosa
import numpy as np
import pytest
import soundfile as sf

from kimia_jax.audio import AudioError, load_audio, split_segments, token_len


def _tone(sr: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234 * t)
    x = np.stack([x * (1 + 0.2 * c) for c in range(channels)])
    return x.astype(np.float32)


def test_flac_16k_is_int16_over_32768(fixtures_dir):
    path = fixtures_dir / "audio" / "short_16k.flac"
    wav = load_audio(path)
    raw, sr = sf.read(path, dtype="int16")
    assert sr == 16000 and wav.dtype == np.float32 and wav.shape == (97928,)
    np.testing.assert_array_equal(wav, raw.astype(np.float32) / 32768)


def test_stereo_44k_file_and_array_match_librosa(tmp_path):
    x = _tone(44100, 1.3, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, x.T, 44100, subtype="PCM_16")
    want, _ = librosa.load(path, sr=16000)  # the official loader: mean of channels, then soxr_hq
    got = load_audio(path)
    np.testing.assert_array_equal(got, want)
    pcm = sf.read(path, dtype="float32")[0].T  # [C, L]
    np.testing.assert_array_equal(load_audio(pcm, sr=44100), want)
    assert got.shape == (int(np.ceil(x.shape[1] * 16000 / 44100)),)


@pytest.mark.parametrize("fmt", ["ogg", "mp3"])
def test_compressed_formats(tmp_path, fmt):
    x = _tone(22050, 0.8)[0]
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, x, 22050, format=fmt.upper())
    wav = load_audio(path)
    assert wav.dtype == np.float32 and abs(len(wav) - 0.8 * 16000) < 1200  # mp3 adds codec delay
    np.testing.assert_array_equal(wav, librosa.load(path, sr=16000)[0])


def test_int16_array_scaled_and_silence_valid():
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    np.testing.assert_array_equal(load_audio(pcm), pcm / np.float32(32768))
    silence = load_audio(np.zeros(32000, np.float32))
    assert silence.shape == (32000,) and not silence.any()


def test_bad_inputs_have_clear_messages(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{tmp_path / 'nope.wav'}: no such audio file")
    ):
        load_audio(tmp_path / "nope.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=re.escape(f"{empty}: file is empty (0 bytes)")):
        load_audio(empty)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioError, match=re.escape(f"{garbage}: cannot decode audio")):
        load_audio(garbage)
    no_samples = tmp_path / "no_samples.wav"
    sf.write(no_samples, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=re.escape(f"{no_samples}: zero-length audio (0 samples)")):
        load_audio(no_samples)
    nan_file = tmp_path / "nan.wav"
    x = np.zeros(1000, np.float32)
    x[10] = np.nan
    x[20] = np.inf
    sf.write(nan_file, x, 16000, subtype="FLOAT")
    with pytest.raises(
        AudioError, match=re.escape(f"{nan_file}: audio contains 2 NaN or inf sample(s)")
    ):
        load_audio(nan_file)
    with pytest.raises(AudioError, match=r"array of shape \(0,\): zero-length audio"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(
        AudioError,
        match=r"array of shape \(3,\): audio contains 1 NaN or inf sample\(s\) "
        r"\(first at flat index 1\)",
    ):
        load_audio(np.array([0.0, np.nan, 0.0], np.float32))
    with pytest.raises(AudioError, match=r"\(40, 30\): neither axis looks like channels"):
        load_audio(np.zeros((40, 30), np.float32))
    with pytest.raises(AudioError, match=r"expected \[samples\], \[channels, samples\]"):
        load_audio(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path}: is a folder")):
        load_audio(tmp_path)
    with pytest.raises(AudioError, match="must be a path, an array or an"):
        load_audio([0.0, 0.1])
    with pytest.raises(AudioError, match="dtype bool is not an audio dtype"):
        load_audio(np.zeros(10, bool))
    with pytest.raises(AudioError, match="sample rate must be a positive integer in Hz"):
        load_audio((np.zeros(100, np.float32), 16000.5))
    with pytest.raises(AudioError, match="sample rate must be positive"):
        load_audio((np.zeros(100, np.float32), 0))
    with pytest.raises(AudioError, match="must be \\(array, sample_rate\\), got 3 items"):
        load_audio((np.zeros(100, np.float32), 16000, 1))
    with pytest.raises(ValueError, match="either in the \\(array, sample_rate\\) tuple or as sr="):
        load_audio((np.zeros(100, np.float32), 16000), sr=16000)
    with pytest.raises(ValueError, match="sr= is only for array inputs"):
        load_audio(empty, sr=8000)


def test_array_layouts_dtypes_and_rate_tuples_match_the_file_loader(tmp_path):
    """Every array form the file loader produces is accepted and gives the file's result."""
    x = _tone(44100, 0.5, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, x.T, 44100, subtype="PCM_16")
    want = load_audio(path)
    pcm16, rate = sf.read(path, dtype="int16")  # [L, C] int16, soundfile's layout
    np.testing.assert_array_equal(load_audio((pcm16, rate)), want)
    np.testing.assert_array_equal(load_audio(pcm16.T, sr=rate), want)
    f32 = sf.read(path, dtype="float32")[0]
    np.testing.assert_array_equal(load_audio((f32, 44100)), want)
    np.testing.assert_array_equal(load_audio((f32.astype(np.float64), np.int64(44100))), want)
    u8 = np.array([0, 128, 255], np.uint8)
    np.testing.assert_array_equal(load_audio(u8), np.array([-1.0, 0.0, 127 / 128], np.float32))


def test_segments_and_token_len():
    wav = np.zeros(480000 + 80000, np.float32)
    segs = split_segments(wav)
    assert [len(s) for s in segs] == [480000, 80000]
    assert [token_len(len(s)) for s in segs] == [375, 63]
    assert token_len(1) == 1 and token_len(1280) == 1 and token_len(1281) == 2

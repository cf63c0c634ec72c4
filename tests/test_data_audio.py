"""Audio loading (formats, downmix, resampling, bad files), crop/pad, batching and RawBoost."""
from __future__ import annotations


import numpy as np
import pytest
import soundfile as sf
import torch

from xai_lib.data.audio import AudioError, crop_or_pad, load_audio, pad_batch
from xai_lib.data.rawboost import rawboost

SR = 16000


def _sine(freq: float, n: int, sr: int = SR) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


@pytest.mark.parametrize("fmt,ext", [("FLAC", ".flac"), ("WAV", ".wav"), ("OGG", ".ogg")])
def test_load_formats_mono_16k(tmp_path, fmt, ext):
    x = _sine(440.0, SR)
    path = tmp_path / f"a{ext}"
    sf.write(str(path), x, SR, format=fmt)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == len(x)
    if fmt != "OGG":  # lossless: PCM16 quantisation only
        np.testing.assert_allclose(y, x, atol=1e-4)
    assert abs(_peak_hz(y) - 440.0) < 2.0


def test_stereo_is_downmixed_by_mean(tmp_path):
    left, right = _sine(300.0, 8000), np.zeros(8000, dtype=np.float32)
    sf.write(str(tmp_path / "st.wav"), np.stack([left, right], axis=1), SR, subtype="FLOAT")
    y = load_audio(tmp_path / "st.wav")
    np.testing.assert_allclose(y, 0.5 * left, atol=1e-6)


def test_44k1_is_resampled_to_16k(tmp_path):
    sr_in = 44100
    sf.write(str(tmp_path / "hi.flac"), _sine(1000.0, sr_in, sr_in), sr_in)
    y = load_audio(tmp_path / "hi.flac", sample_rate=SR)
    assert abs(len(y) - SR) <= 1  # one second stays one second
    assert abs(_peak_hz(y) - 1000.0) < 3.0  # the tone keeps its pitch


def test_bad_audio_raises_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 4)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), SR)
    nan = tmp_path / "nan.wav"
    x = _sine(200.0, 1600)
    x[100] = np.nan
    sf.write(str(nan), x, SR, subtype="FLOAT")
    cases = {corrupt: "unreadable or corrupt", empty: "zero length", nan: "NaN", tmp_path / "gone.flac": "does not exist"}
    for path, reason in cases.items():
        with pytest.raises(AudioError) as err:
            load_audio(path)
        assert str(path) in str(err.value) and reason in str(err.value)
        assert "on_bad_audio" in str(err.value)  # says what to do
        assert err.value.path == path


def test_crop_or_pad_lengths():
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(crop_or_pad(x, 4), [0, 1, 2, 3])  # deterministic start 0
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(20):
        y = crop_or_pad(x, 4, rng)
        assert len(y) == 4 and np.all(np.diff(y) == 1)  # a contiguous crop
        starts.add(int(y[0]))
    assert len(starts) > 1  # random starts
    np.testing.assert_array_equal(crop_or_pad(np.array([1.0, 2.0, 3.0]), 7), [1, 2, 3, 1, 2, 3, 1])  # repeat-pad
    assert len(crop_or_pad(x, 10)) == 10


def test_pad_batch_zero_pads_and_reports_lengths():
    wave, lengths = pad_batch([np.ones(3), torch.full((5,), 2.0), np.ones(1)])
    assert wave.shape == (3, 5) and wave.dtype == torch.float32
    assert lengths.tolist() == [3, 5, 1] and lengths.dtype == torch.long
    assert wave[0, 3:].abs().sum() == 0 and wave[1].tolist() == [2.0] * 5


@pytest.mark.parametrize("algo", range(9))
def test_rawboost_algorithms_finite_same_length(algo):
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(8000) * np.hanning(8000)).astype(np.float32)
    y = rawboost(x, algo, SR, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    if algo == 0:
        assert y is x
    else:
        assert not np.allclose(y, x)  # it did something
        np.testing.assert_array_equal(y, rawboost(x, algo, SR, np.random.default_rng(1)))  # reproducible


def test_rawboost_ssi_respects_snr_range():
    x = _sine(500.0, SR)
    for seed in range(5):
        y = rawboost(x, 3, SR, np.random.default_rng(seed))
        snr = 10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))
        assert 9.5 <= snr <= 40.5


def test_rawboost_rejects_unknown_algo():
    with pytest.raises(ValueError, match="0 \\(off\\) or 1..8"):
        rawboost(np.zeros(100, dtype=np.float32), 9, SR, np.random.default_rng(0))

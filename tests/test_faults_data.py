"""Fault injection, data: every bad file or protocol line has a documented outcome (a clear error
naming the file/line, a conversion, or skip-and-report), never a stack trace from inside torch.

Already covered elsewhere (not repeated here): corrupt FLAC with a valid magic, zero-length WAV,
NaN and missing files in ``load_audio`` (tests/test_data_audio.py::test_bad_audio_raises_naming_the_file),
stereo downmix and 44.1 kHz resampling (test_data_audio.py), a corrupt file skipped by the datasets
(test_data_datasets.py::test_bad_audio_error_or_skip_with_report), a 5-column protocol line with four
columns, unknown 5-column/CSV labels and duplicate ids in a 5-column protocol
(test_data_protocols.py::test_malformed_line_names_file_and_line, ::test_bad_label_names_file_and_line,
::test_duplicate_utterance_names_both_lines), audio shorter than 400 samples given to the detector
directly (test_detector.py::test_too_short_audio_is_a_clear_error).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_model_dict

from xai_lib.explanation.methods import METHODS, Attributor
from xai_lib.config import DataConfig, ModelConfig, Stage1Config, XAIConfig, config_from_dict, load_config
from xai_lib.data.audio import AudioError, crop_or_pad, load_audio
from xai_lib.data.datasets import EvalDataset, TrainDataset, build_split, collate_padded
from xai_lib.data.protocols import ProtocolError, Utterance, read_protocol
from xai_lib.detector.model import Detector
from xai_lib.importance.checkpoint import load_xai, save_xai
from xai_lib.importance.module import XAIModule
from xai_lib.detector.training import score_utterances

SR = 16000


def _tone(n: int, sr: int = SR, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One small file per fault (and one good file)."""
    d = tmp_path_factory.mktemp("bad_audio")
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}

    def write(name: str, x: np.ndarray, sr: int = SR, **kw) -> None:
        out[name.split(".")[0]] = d / name
        sf.write(str(d / name), x, sr, **kw)

    write("good.flac", _tone(8000))
    (d / "corrupt.flac").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())  # random bytes
    out["corrupt"] = d / "corrupt.flac"
    (d / "zero_bytes.flac").write_bytes(b"")
    out["zero_bytes"] = d / "zero_bytes.flac"
    write("no_samples.wav", np.zeros(0, np.float32))  # a header and no samples (FLAC writes 0 bytes)
    write("one_sample.wav", np.array([0.25], np.float32))
    write("short.flac", _tone(399))
    write("silence.flac", np.zeros(8000, np.float32))
    write("rate8k.flac", _tone(4000, 8000), 8000)
    write("rate48k.flac", _tone(24000, 48000), 48000)
    write("six_channels.flac", np.stack([_tone(8000, hz=300.0 * (c + 1)) for c in range(6)], axis=1))
    nan = _tone(8000)
    nan[4321] = np.nan
    write("nan.wav", nan, subtype="FLOAT")
    inf = _tone(8000)
    inf[10] = np.inf
    write("inf.wav", inf, subtype="FLOAT")
    return out


UNUSABLE = {  # file -> the reason the error / skip report gives
    "corrupt": "unreadable or corrupt",
    "zero_bytes": "empty (0 bytes",
    "no_samples": "zero length",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
}
SCORABLE = ["good", "one_sample", "short", "silence", "rate8k", "rate48k", "six_channels"]


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(config_from_dict(tiny_model_dict(), ModelConfig)).eval()


def _cfg(*overrides: str) -> Stage1Config:
    return load_config(None, Stage1Config, ["training.eval_batch_size=4", *overrides])


def _utts(files: dict[str, Path], names) -> list[Utterance]:
    return [Utterance(n, files[n], 1) for n in names]


# ----------------------------------------------------------------------------- load_audio


@pytest.mark.parametrize("name", sorted(UNUSABLE))
def test_unusable_file_is_one_audio_error_naming_it(files, name):
    with pytest.raises(AudioError) as err:
        load_audio(files[name])
    assert str(files[name]) in str(err.value) and UNUSABLE[name] in str(err.value)
    assert "on_bad_audio" in str(err.value)  # says what to do


@pytest.mark.parametrize("name,sr", [("rate8k", 8000), ("rate48k", 48000)])
def test_other_sample_rates_are_resampled_keeping_duration_and_pitch(files, name, sr):
    x = load_audio(files[name])
    assert x.dtype == np.float32 and len(x) == 8000  # 0.5 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(x))
    assert np.argmax(spectrum) * SR / len(x) == pytest.approx(1000.0, abs=4)  # the 1 kHz tone stays 1 kHz


def test_six_channels_are_downmixed_to_their_mean(files):
    x = load_audio(files["six_channels"])
    expected = np.mean([_tone(8000, hz=300.0 * (c + 1)) for c in range(6)], axis=0)
    assert x.shape == (8000,)
    np.testing.assert_allclose(x, expected, atol=1e-4)  # FLAC stores 16-bit samples


# ----------------------------------------------------------------------------- NaN through the datasets


def test_nan_audio_is_reported_by_file_by_both_datasets(files, caplog):
    utts = _utts(files, ["good", "nan", "inf"])
    for ds in (TrainDataset(utts, crop_samples=4000), EvalDataset(utts)):
        with pytest.raises(AudioError, match=f"{files['nan']}: audio contains NaN"):
            ds[1]
    with caplog.at_level(logging.WARNING, logger="xai_lib.data.datasets"):
        ds = TrainDataset(utts, crop_samples=4000, rawboost_algo=5, on_bad_audio="skip")
        batch = collate_padded([ds[i] for i in range(3)])
    assert batch["utt_ids"] == ["good"] and torch.isfinite(batch["wave"]).all()
    report = ds.bad_audio_report()
    assert "2 of 3 utterances skipped" in report and str(files["nan"]) in report and str(files["inf"]) in report
    assert str(files["nan"]) in caplog.text


# ----------------------------------------------------------------------------- scoring a split of bad files


def test_scoring_skips_and_reports_unusable_files_and_scores_the_rest(files, detector, caplog):
    names = SCORABLE + sorted(UNUSABLE)
    with caplog.at_level(logging.WARNING):
        scores = score_utterances(detector, _utts(files, names), _cfg("data.on_bad_audio=skip"), progress=False)
    assert set(scores) == set(SCORABLE)
    assert all(np.isfinite(v) for v in scores.values())
    for name, reason in UNUSABLE.items():  # each skipped file is named with its reason
        assert any(str(files[name]) in r.getMessage() and reason in r.getMessage() for r in caplog.records), name
    for name in ("one_sample", "short"):  # and each padded one
        assert any(name in r.getMessage() and "repeat-padded" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", sorted(UNUSABLE))
def test_scoring_with_on_bad_audio_error_stops_naming_the_file(files, detector, name):
    with pytest.raises(AudioError) as err:
        score_utterances(detector, _utts(files, ["good", name]), _cfg(), progress=False)
    assert str(files[name]) in str(err.value)


def test_files_shorter_than_one_ssl_frame_are_scored_as_their_repeat_padding(files, detector):
    """1 and 399 samples: scored like the 400-sample repeat of the file, alone or in a batch."""
    scores = score_utterances(detector, _utts(files, ["one_sample", "short", "good"]), _cfg(), progress=False)
    for name in ("one_sample", "short"):
        padded = torch.from_numpy(crop_or_pad(load_audio(files[name]), 400))[None]
        with torch.no_grad():
            expected = float(detector(padded).logits[0, 1])
        assert scores[name] == pytest.approx(expected, abs=1e-4)


def test_short_files_are_padded_to_the_receptive_field_of_any_front_end(files):
    arch = tiny_model_dict()
    arch["ssl"]["conv_kernel"] = [20, 3, 3, 3, 3, 2, 2]  # 410 samples per frame
    torch.manual_seed(0)
    wide = Detector(config_from_dict(arch, ModelConfig)).eval()
    assert wide.min_input_samples == 410
    scores = score_utterances(wide, _utts(files, ["short", "good"]), _cfg(), progress=False)
    assert set(scores) == {"short", "good"}


def test_silence_is_scored_explained_and_augmented_without_nan(files, detector, tmp_path):
    scores = score_utterances(detector, _utts(files, ["silence", "good"]), _cfg(), progress=False)
    assert np.isfinite(scores["silence"])

    for algo in range(1, 9):  # RawBoost on an all-zero training crop
        item = TrainDataset(_utts(files, ["silence"]), crop_samples=4000, rawboost_algo=algo)[0]
        assert torch.isfinite(item["wave"]).all(), algo

    xai_cfg = XAIConfig(prototype_mode="fixed", importance_hidden_dim=8)
    module = XAIModule(32, xai_cfg)
    module.prototypes.set_from_class_means(torch.randn(2, 32))
    xai = load_xai(save_xai(module, tmp_path / "xai.pth", xai_cfg, "d.pth", "0" * 64), detector=detector)
    wave, lengths = torch.zeros(2, 8000), torch.tensor([8000, 5000])
    attributor = Attributor(detector, importance_model=xai)
    for method in METHODS:
        att = attributor.attribute(wave, lengths, method=method, target=0)
        assert torch.isfinite(att.scores).all() and torch.isfinite(att.normalized().scores).all(), method
    out = xai.explain(detector, wave, lengths)
    assert torch.isfinite(out.importance).all() and torch.isfinite(out.utterance_score).all()


# ----------------------------------------------------------------------------- protocols


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name,text,bad_line,match",
    [
        ("p3.txt", "LA_T_1.flac train bonafide\nLA_T_2.flac spoof\n", 2, "expected 3 columns"),
        ("meta.csv", "file,speaker,label\n0.wav,Alice,spoof\n1.wav,bona-fide\n", 3, "expected 3 comma-separated"),
        ("trials.txt", "LA_E_1\nLA_E_2 LA_E_3\n", 2, "one utterance id per line"),
        ("p3.txt", "LA_T_1.flac train bonafide\nLA_T_2.flac train genuine\n", 2, "unknown label 'genuine'"),
        ("p5.txt", "LA_0079 LA_T_1 - - bonafide\nLA_0079 LA_T_2 - A01 -\n", 2, "unknown label '-'"),
    ],
    ids=["3col-too-few-columns", "csv-too-few-fields", "2021-trial-list-two-columns", "3col-bad-label",
         "5col-label-missing"],
)
def test_malformed_protocol_lines_name_file_and_line(tmp_path, name, text, bad_line, match):
    proto = _write(tmp_path / name, text)
    for call in (lambda: read_protocol(proto, root=tmp_path),  # the reader and the config path users take
                 lambda: build_split(DataConfig(root=str(tmp_path), train_protocol=name), "train")):
        with pytest.raises(ProtocolError) as err:
            call()
        assert f"{proto}:{bad_line}:" in str(err.value) and match in str(err.value)
        assert text.splitlines()[bad_line - 1] in str(err.value)  # quotes the line


@pytest.mark.parametrize(
    "name,text,lines",
    [
        ("p3.txt", "LA_T_1.flac train bonafide\nLA_T_2.flac train spoof\nLA_T_1.wav train spoof\n", (1, 3)),
        ("meta.csv", "file,label\n0.wav,spoof\n1.wav,bona-fide\n0.wav,bona-fide\n", (2, 4)),
    ],
    ids=["3col", "in_the_wild"],
)
def test_duplicate_ids_in_other_formats_name_both_lines(tmp_path, name, text, lines):
    proto = _write(tmp_path / name, text)
    with pytest.raises(ProtocolError, match=f"appears twice, on lines {lines[0]} and {lines[1]}"):
        read_protocol(proto, root=tmp_path)

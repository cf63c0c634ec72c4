"""Plot helpers: run under Agg on random data, save non-empty PNGs, draw the given data."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from xai_lib import plots  # noqa: E402
from xai_lib.explanation.metrics import deletion_insertion  # noqa: E402

SR = 16000
HOP = 0.02
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_show_and_no_leaks(monkeypatch):
    """Fail if a helper calls plt.show(); close whatever a test leaves open."""

    def _forbidden(*args, **kwargs):
        raise AssertionError("plot helpers must never call plt.show()")

    monkeypatch.setattr(plt, "show", _forbidden)
    yield
    plt.close("all")


@pytest.fixture
def wave() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)


def _assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_importance_overlay_draws_the_exact_attribution_on_the_time_axis(wave, tmp_path):
    n_frames = 75  # 1.5 s at 20 ms
    importance = np.random.default_rng(1).random(n_frames)
    overlay = plots.plot_importance_overlay(
        wave, importance, frame_hop_s=HOP, sample_rate=SR,
        spoof_spans_s=[(0.4, 0.9)], threshold=0.8,
    )
    np.testing.assert_array_equal(overlay.importance, importance)
    np.testing.assert_array_equal(np.asarray(overlay.overlay_image.get_array()), importance[None, :])
    np.testing.assert_array_equal(overlay.line.get_ydata(), importance)
    assert overlay.extent[0] == 0.0
    assert overlay.extent[1] == pytest.approx(n_frames * HOP)
    assert overlay.overlay_image.get_extent()[:2] == pytest.approx([0.0, n_frames * HOP])
    # spectrogram and importance share the time axis (seconds)
    assert overlay.spectrogram.get_coordinates()[..., 0].max() == pytest.approx(wave.size / SR)
    assert overlay.ax.get_xlim() == pytest.approx((0.0, 1.5))
    # every highlighted span holds only frames above the threshold, and all of them
    above = np.flatnonzero(importance > 0.8)
    covered = [i for s, e in overlay.highlighted_spans_s
               for i in range(round(s / HOP), round(e / HOP))]
    assert covered == above.tolist()
    assert overlay.spoof_spans_s == [(0.4, 0.9)]
    # the input is copied, not aliased
    importance[0] = -5.0
    assert overlay.importance[0] != -5.0
    plots.save_figure(overlay.figure, tmp_path / "overlay.png")
    _assert_png(tmp_path / "overlay.png")


def test_overlay_accepts_torch_and_an_existing_ax(wave):
    fig, ax = plt.subplots()
    overlay = plots.plot_importance_overlay(torch.from_numpy(wave), torch.zeros(75), ax=ax)
    assert overlay.ax is ax and overlay.figure is fig
    with pytest.raises(ValueError, match="importance must be 1-D"):
        plots.plot_importance_overlay(wave, np.zeros((2, 75)))


@pytest.mark.parametrize("kind, scale", [("logmel", "symlog"), ("linear", "linear")])
def test_spectrogram_has_time_and_hz_axes(wave, tmp_path, kind, scale):
    mesh = plots.plot_spectrogram(wave, SR, kind=kind)
    xy = mesh.get_coordinates()  # (F + 1, frames + 1, 2) cell corners
    assert xy[..., 0].min() == pytest.approx(0.0) and xy[..., 0].max() == pytest.approx(1.5)  # seconds
    assert xy[..., 1].min() == pytest.approx(0.0) and xy[..., 1].max() == pytest.approx(SR / 2, rel=0.01)  # Hz
    assert mesh.axes.get_yscale() == scale  # librosa draws the mel axis on a mel-like scale, in Hz
    assert mesh.axes.get_ylabel() == "frequency (Hz)" and mesh.axes.get_xlabel() == "time (s)"
    assert np.all(np.isfinite(mesh.get_array()))
    path = plots.save_figure(mesh.axes.figure, tmp_path / f"spec_{kind}")
    assert path.suffix == ".png"
    _assert_png(path)


def test_single_axes_helpers_save_pngs(wave, tmp_path):
    rng = np.random.default_rng(2)
    bona, spoof = rng.normal(2, 1, 200), rng.normal(-2, 1, 300)
    axes = {
        "waveform": plots.plot_waveform(wave, SR, spoof_spans_s=[(0.2, 0.5)]),
        "similarity": plots.plot_prototype_similarity(rng.random(75), rng.random(75), HOP),
        "det": plots.plot_det_curve(bona, spoof, label="tiny"),
        "hist": plots.plot_score_histogram(bona, spoof, threshold=0.0),
        "loss": plots.plot_loss_curves({"train": [1.0, 0.7, 0.5], "dev": [1.1, 0.9]}),
        "sims": plots.plot_similarity_distributions(
            {"bona": rng.uniform(-1, 1, 100), "spoof": torch.rand(4, 25)}),
    }
    for name, ax in axes.items():
        _assert_png(plots.save_figure(ax.figure, tmp_path / "figs" / f"{name}.png"))
    assert plt.get_fignums() == []  # save_figure closed every figure
    # the DET legend reports the EER of the scores
    from xai_lib.detector.metrics import utterance_eer

    eer = utterance_eer(bona, spoof)[0]
    assert f"EER {100 * eer:.2f}%" in axes["det"].get_legend().get_texts()[0].get_text()


def test_method_comparison_one_row_per_method_sharing_time(wave, tmp_path):
    rng = np.random.default_rng(3)
    attributions = {"learned": rng.random(75), "ig": rng.normal(size=75),
                    "saliency": torch.rand(75)}
    fig = plots.plot_method_comparison(wave, attributions, HOP, SR, spoof_spans_s=[(0.4, 0.9)])
    assert len(fig.axes) == 4
    assert [ax.get_ylabel() for ax in fig.axes[1:]] == list(attributions)
    assert all(ax.get_xlim() == pytest.approx((0.0, 1.5)) for ax in fig.axes)
    _assert_png(plots.save_figure(fig, tmp_path / "comparison.png"))


def test_deletion_insertion_plot(tmp_path):
    evidence = torch.zeros(2, 20)
    evidence[:, :4] = 1.0

    def score_fn(keep):  # fraction of evidence frames kept
        return (keep * evidence).sum(1) / evidence.sum(1)

    rng = np.random.default_rng(4)
    results = {
        "learned": deletion_insertion(score_fn, evidence.numpy(), steps=10),
        "random": deletion_insertion(score_fn, rng.random((2, 20)), steps=10),
    }
    fig = plots.plot_deletion_insertion(results)
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == f"learned (AUC {results['learned']['deletion_auc']:.3f})"
    _assert_png(plots.save_figure(fig, tmp_path / "del_ins.png"))
    with pytest.raises(KeyError, match="deletion_insertion"):
        plots.plot_deletion_insertion({"bad": {"fractions": [0, 1]}})


def test_save_figure_rejects_other_formats(tmp_path):
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="PNG"):
        plots.save_figure(fig, tmp_path / "x.pdf")


@pytest.mark.parametrize("kind", ["logmel", "linear"])
def test_spectrogram_values_are_librosas_defaults(kind):
    """compute_spectrogram (torchaudio) gives what librosa's stft / melspectrogram / power_to_db
    (ref=max, top_db=80) give with their defaults; the reference here is numpy's FFT with
    librosa's mel filters (which compile nothing)."""
    import librosa

    from xai_lib.plots import compute_spectrogram

    sr, n_fft, win, hop = 16000, 512, 400, 160
    x = (0.1 * np.random.default_rng(0).standard_normal(30000)).astype(np.float32)
    spec, got_hop = compute_spectrogram(x, sr, kind)
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2:(n_fft - win) // 2 + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    padded = np.pad(x.astype(np.float64), n_fft // 2)  # centred frames, zeros outside
    frames = np.stack([padded[i:i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)], axis=1)
    power = np.abs(np.fft.rfft(frames * window[:, None], axis=0)) ** 2
    if kind == "logmel":
        power = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=80, fmax=sr / 2) @ power
    db = 10 * np.log10(np.maximum(power, 1e-10) / power.max())
    db = np.maximum(db, -80.0)
    assert got_hop == hop and spec.shape == db.shape
    np.testing.assert_allclose(spec, db, atol=1e-3)

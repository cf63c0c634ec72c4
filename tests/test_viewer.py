"""The importance viewer, driven without a browser: set widget values, check state and drawn data."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from xai_lib.plots import spans_above_threshold  # noqa: E402
from xai_lib.explanation.viewer import ImportanceViewer, minmax_normalize  # noqa: E402

SR = 16000
HOP = 0.02
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _items() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"utt_id": "u_spoof", "wave": (0.1 * rng.standard_normal(int(0.4 * SR))).astype(np.float32),
         "label": 0, "score": -2.5, "attack": "A07", "spoof_spans_s": [(0.1, 0.2)]},
        {"utt_id": "u_bona", "wave": (0.1 * rng.standard_normal(int(0.6 * SR))).astype(np.float32),
         "label": 1, "score": 1.25, "attack": None, "spoof_spans_s": None},
    ]


def _fake_attribution(item: dict, method: str) -> np.ndarray:
    """Known per-(utterance, method) output: T = duration / 20 ms frames."""
    T = item["wave"].size // int(HOP * SR)
    t = np.arange(T, dtype=np.float64)
    if method == "ramp":
        return 3.0 * t - 7.0  # normalises to t / (T - 1)
    if method == "bump":
        return np.exp(-0.5 * ((t - T / 3) / 2.0) ** 2)
    raise ValueError(f"no fake attribution for {method!r}")


class CountingAttribution:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, item: dict, method: str) -> np.ndarray:
        self.calls.append((item["utt_id"], method))
        return _fake_attribution(item, method)


@pytest.fixture(autouse=True)
def _no_show_and_no_leaks(monkeypatch):
    def _forbidden(*args, **kwargs):
        raise AssertionError("the viewer must never call plt.show()")

    monkeypatch.setattr(plt, "show", _forbidden)
    yield
    plt.close("all")


@pytest.fixture
def viewer(tmp_path) -> ImportanceViewer:
    return ImportanceViewer(_items(), CountingAttribution(), methods=["ramp", "bump"],
                            sample_rate=SR, frame_hop_s=HOP, save_dir=tmp_path / "figures")


def _overlay_array(fig) -> np.ndarray:
    """The importance heat strip drawn over the spectrogram (the one (1, T) image)."""
    strips = [im for ax in fig.axes for im in ax.get_images() if im.get_array().shape[0] == 1]
    assert len(strips) == 1
    return np.asarray(strips[0].get_array())[0]


def test_initial_state_shows_first_item_without_pyplot_figures(viewer):
    assert viewer.last_error is None
    assert viewer.current_item["utt_id"] == "u_spoof"
    assert viewer.figure is not None and bytes(viewer.image.value)[:8] == PNG_MAGIC
    assert plt.get_fignums() == []  # drawn on a bare Agg Figure, nothing registered with pyplot
    assert viewer.widget.children  # something to display
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_picking_an_utterance_changes_item_audio_and_figure(viewer):
    audio_before = viewer.audio.value
    viewer.utterance.value = "u_bona"
    item = viewer.current_item
    assert item["utt_id"] == "u_bona"
    assert viewer.audio.value != audio_before
    played, sr = sf.read(io.BytesIO(viewer.audio.value), dtype="float32")
    assert sr == SR
    np.testing.assert_allclose(played, item["wave"], atol=1.0 / 32768 + 1e-6)
    expected = minmax_normalize(_fake_attribution(item, "ramp"))
    np.testing.assert_allclose(_overlay_array(viewer.figure), expected)
    mesh = next(c for c in viewer.figure.axes[0].collections if isinstance(c, QuadMesh))
    assert mesh.get_coordinates()[..., 0].max() == pytest.approx(0.6)  # 0.6 s spectrogram
    assert "u_bona" in viewer.figure.get_suptitle() and "bona fide" in viewer.figure.get_suptitle()


def test_method_change_draws_that_methods_normalised_attribution(viewer):
    viewer.method.value = "bump"
    expected = minmax_normalize(_fake_attribution(viewer.current_item, "bump"))
    np.testing.assert_allclose(viewer.current_importance, expected)
    np.testing.assert_allclose(viewer.current_raw_importance, _fake_attribution(viewer.current_item, "bump"))
    np.testing.assert_allclose(_overlay_array(viewer.figure), expected)
    np.testing.assert_allclose(viewer.overlay.line.get_ydata(), expected)
    assert "bump" in viewer.figure.get_suptitle()
    viewer.method.value = "ramp"
    T = expected.size
    np.testing.assert_allclose(_overlay_array(viewer.figure), np.arange(T) / (T - 1))


def test_threshold_highlights_exactly_the_frames_above_it(viewer):
    for thr in (0.0, 0.25, 0.5, 0.9, 1.0):
        viewer.threshold.value = thr
        np.testing.assert_array_equal(viewer.highlighted_frames, viewer.current_importance > thr)
        assert viewer.overlay.threshold == pytest.approx(thr)
        assert viewer.overlay.highlighted_spans_s == spans_above_threshold(viewer.current_importance, thr, HOP)
    viewer.threshold.value = 0.5
    T = viewer.current_importance.size
    assert viewer.highlighted_frames.sum() == np.sum(np.arange(T) / (T - 1) > 0.5)


def test_audio_never_autoplays(viewer):
    assert viewer.audio.autoplay is False
    viewer.utterance.value = "u_bona"
    assert viewer.audio.autoplay is False
    assert viewer.audio.format == "wav"


def test_save_button_writes_a_png_and_reports_the_path(viewer, tmp_path):
    viewer.utterance.value = "u_bona"
    viewer.method.value = "bump"
    viewer.save_button.click()
    path = tmp_path / "figures" / "viewer_u_bona_bump.png"
    assert viewer.last_saved == path
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC
    assert str(path) in viewer.status.value
    other = viewer.save_png(tmp_path / "elsewhere" / "x.png")
    assert other.read_bytes()[:8] == PNG_MAGIC


def test_option_labels_show_id_label_attack_and_score(viewer):
    labels = [label for label, _ in viewer.utterance.options]
    assert "u_spoof" in labels[0] and "spoof" in labels[0] and "A07" in labels[0] and "-2.500" in labels[0]
    assert "u_bona" in labels[1] and "bona fide" in labels[1] and "+1.250" in labels[1]


def test_attributions_are_computed_once_per_utterance_and_method(tmp_path):
    fn = CountingAttribution()
    v = ImportanceViewer(_items(), fn, methods=["ramp", "bump"], save_dir=tmp_path)
    for utt, method in [("u_bona", "ramp"), ("u_bona", "bump"), ("u_spoof", "bump"), ("u_spoof", "ramp")]:
        v.utterance.value = utt
        v.method.value = method
    v.threshold.value = 0.1
    assert sorted(fn.calls) == sorted(set(fn.calls)) and len(fn.calls) == 4


def test_similarity_row_draws_the_prototype_similarities(tmp_path):
    def sims(item):
        T = item["wave"].size // 320
        return np.linspace(-1, 1, T), np.linspace(1, -1, T)

    v = ImportanceViewer(_items(), _fake_attribution, methods=["ramp"], similarity_fn=sims, save_dir=tmp_path)
    assert len(v.figure.axes) == 4  # spectrogram + its twin, waveform, similarity
    lines = v.figure.axes[2].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), np.linspace(-1, 1, 20))
    np.testing.assert_allclose(lines[1].get_ydata(), np.linspace(1, -1, 20))


def test_a_failing_method_shows_an_error_instead_of_breaking_the_viewer(viewer):
    viewer.method.options = ["ramp", "bump", "broken"]
    viewer.method.value = "broken"
    assert "no fake attribution" in viewer.status.value and viewer.last_error
    viewer.method.value = "ramp"
    assert viewer.last_error is None


@pytest.mark.parametrize(
    "items, message",
    [
        ([], "at least one item"),
        ([{"utt_id": "a"}], "'wave'"),
        ([{"utt_id": "a", "wave": np.zeros(800)}, {"utt_id": "a", "wave": np.zeros(800)}], "duplicate utt_id"),
        ([{"utt_id": "a", "wave": np.zeros(800), "label": 2}], "'label'"),
    ],
)
def test_bad_items_raise_one_clear_error(items, message):
    with pytest.raises(ValueError, match=message):
        ImportanceViewer(items, _fake_attribution, methods=["ramp"])


def test_from_detector_end_to_end(tiny_model_config, tmp_path):
    from xai_lib.explanation.methods import Attributor
    from xai_lib.detector.model import Detector

    torch.manual_seed(0)
    detector = Detector(tiny_model_config).eval()
    items = _items()
    items[1]["score"] = None  # filled by running the detector
    v = ImportanceViewer.from_detector(detector, items, methods=("saliency", "random"), save_dir=tmp_path)
    assert v.last_error is None
    wave = torch.as_tensor(items[1]["wave"])[None, :]
    with torch.no_grad():
        expected_score = float(detector(wave).logits[0, 1])
    assert v.items[1]["score"] == pytest.approx(expected_score, abs=1e-5)
    assert f"{expected_score:+.3f}" in v.utterance.options[1][0]

    v.utterance.value = "u_bona"
    att = Attributor(detector).attribute(wave, method="saliency", target=0)
    expected = minmax_normalize(att.per_utterance()[0])
    np.testing.assert_allclose(v.current_importance, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_overlay_array(v.figure), expected, rtol=1e-5, atol=1e-6)
    v.method.value = "random"
    assert v.current_importance.shape == expected.shape
    assert not np.allclose(v.current_importance, expected)
    v.save_button.click()
    assert (tmp_path / "viewer_u_bona_random.png").stat().st_size > 1000

    with pytest.raises(ValueError, match="importance_model"):
        ImportanceViewer.from_detector(detector, items, methods=["importance"])
    with pytest.raises(ValueError, match="unknown attribution method"):
        ImportanceViewer.from_detector(detector, items, methods=["gradcam"])

    # Grad-CAM is offered; its min-max variant is drawn at its fixed 0.5, the plain one needs a calibration
    v = ImportanceViewer.from_detector(detector, items, methods=("grad_cam", "grad_cam_minmax05"), save_dir=tmp_path)
    assert v.thresholds == {"grad_cam_minmax05": 0.5} and v.current_scale == "minmax"
    v.method.value = "grad_cam_minmax05"
    assert v.current_scale == "absolute" and v.threshold.value == pytest.approx(0.5) and v.last_error is None
    assert v.current_importance.max() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- calibrated scale, verdict, explain a file


def test_a_calibrated_method_is_drawn_absolute_with_tau_and_min_max_stays_reachable(tmp_path):
    v = ImportanceViewer(_items(), _fake_attribution, methods=["ramp", "bump"], thresholds={"ramp": 5.0},
                         save_dir=tmp_path)
    raw = _fake_attribution(v.current_item, "ramp")  # 3 t - 7: -7 ... 50
    assert v.current_scale == "absolute" and v.threshold.value == pytest.approx(5.0)
    np.testing.assert_allclose(v.current_importance, raw)  # absolute: never rescaled
    np.testing.assert_array_equal(v.highlighted_frames, raw > 5.0)
    assert v.overlay.threshold == pytest.approx(5.0)
    assert v.overlay.highlighted_spans_s == spans_above_threshold(raw, 5.0, HOP)
    assert "absolute" in v.overlay.twin_ax.get_ylabel() and "τ = 5" in v.overlay.twin_ax.get_ylabel()
    assert v.threshold.min <= raw.min() and v.threshold.max >= raw.max()
    v.threshold.value = 20.0  # the slider moves tau for this view ...
    np.testing.assert_array_equal(v.highlighted_frames, raw > 20.0)
    v.utterance.value = "u_bona"  # ... and a new utterance resets it to tau
    assert v.threshold.value == pytest.approx(5.0) and v.current_threshold == pytest.approx(5.0)
    # a method without a calibration is drawn min-max, and says so
    v.method.value = "bump"
    assert v.current_scale == "minmax" and "min-max" in v.overlay.twin_ax.get_ylabel()
    np.testing.assert_allclose(v.current_importance, minmax_normalize(_fake_attribution(v.current_item, "bump")))
    assert v.threshold.value == pytest.approx(0.5) and (v.threshold.min, v.threshold.max) == (0.0, 1.0)
    # the toggle draws the calibrated method min-max too
    v.method.value = "ramp"
    v.scale.value = "minmax"
    T = v.current_importance.size
    np.testing.assert_allclose(v.current_importance, np.arange(T) / (T - 1))
    np.testing.assert_array_equal(v.highlighted_frames, np.arange(T) / (T - 1) > 0.5)
    v.scale.value = "absolute"
    assert v.current_scale == "absolute" and v.threshold.value == pytest.approx(5.0)
    assert v.last_error is None


def test_the_verdict_of_the_current_utterance_is_shown(tmp_path):
    v = ImportanceViewer(_items(), _fake_attribution, methods=["ramp"], score_threshold=-1.0, save_dir=tmp_path)
    assert v.current_verdict == "spoof"  # score -2.5 < -1
    assert "SPOOF" in v.verdict.value and "-2.500 &lt; -1.000" in v.verdict.value
    assert "verdict SPOOF" in v.figure.get_suptitle()
    v.utterance.value = "u_bona"
    assert v.current_verdict == "bonafide" and "BONAFIDE" in v.verdict.value
    default = ImportanceViewer(_items(), _fake_attribution, methods=["ramp"], save_dir=tmp_path)
    assert default.current_verdict == "spoof" and "default threshold" in default.verdict.value


def test_explain_file_adds_the_file_and_shows_it(viewer, tmp_path):
    wave = (0.1 * np.random.default_rng(3).standard_normal(int(0.5 * SR))).astype(np.float32)
    sf.write(tmp_path / "clip.wav", wave, SR)
    viewer.method.value = "bump"
    viewer.path.value = str(tmp_path / "clip.wav")
    viewer.explain_button.click()
    assert viewer.last_error is None
    assert viewer.utterance.value == f"file:{tmp_path / 'clip.wav'}"
    item = viewer.current_item
    assert item["wave"].size == wave.size and item["score"] is None and viewer.current_verdict is None
    np.testing.assert_allclose(viewer.current_importance, minmax_normalize(_fake_attribution(item, "bump")))
    assert "clip.wav" in viewer.status.value and len(viewer.items) == 3
    viewer.method.value = "ramp"  # every method works on it
    assert viewer.last_error is None
    viewer.explain_file(tmp_path / "clip.wav")  # again: replaced, not duplicated
    assert len(viewer.items) == 3
    viewer.path.value = str(tmp_path / "missing.wav")
    viewer.explain_button.click()
    assert "missing.wav" in viewer.last_error and "missing.wav" in viewer.status.value
    viewer.utterance.value = "u_spoof"
    assert viewer.last_error is None


def test_explain_file_from_detector_is_the_command_code(tiny_model_config, tmp_path):
    from xai_lib.config import XAIConfig
    from xai_lib.detector.model import Detector
    from xai_lib.explain import Explainer, Explanation
    from xai_lib.importance.inference import LoadedXAI
    from xai_lib.importance.module import XAIModule

    torch.manual_seed(0)
    detector = Detector(tiny_model_config).eval()
    module = XAIModule(detector.ssl_dim, XAIConfig(importance_hidden_dim=8))
    module.prototypes.set_from_class_means(torch.randn(2, detector.ssl_dim))
    xai = LoadedXAI(module=module.eval(), config=XAIConfig(importance_hidden_dim=8), representation="ssl",
                    in_dim=detector.ssl_dim)
    xai.calibration = {"threshold": 0.5, "false_flag_rate": 0.01}
    v = ImportanceViewer.from_detector(detector, _items(), importance_model=xai, methods=("importance", "random"),
                                       thresholds={"random": 0.8}, score_threshold=0.1, save_dir=tmp_path)
    assert v.thresholds == {"random": 0.8, "importance": 0.5}
    assert v.current_scale == "absolute" and v.threshold.value == pytest.approx(0.5)
    wave = (0.1 * np.random.default_rng(5).standard_normal(int(0.7 * SR))).astype(np.float32)
    sf.write(tmp_path / "clip.wav", wave, SR)
    for method, tau in (("importance", 0.5), ("random", 0.8)):
        v.method.value = method
        v.explain_file(tmp_path / "clip.wav")
        e = v.last_explanation
        assert isinstance(e, Explanation) and v.last_error is None
        expected = Explainer(detector, method, threshold=tau, importance_model=xai, score_threshold=0.1)(tmp_path / "clip.wav")
        np.testing.assert_allclose(v.current_importance, expected.frame_scores, rtol=1e-5, atol=1e-6)
        assert v.current_item["score"] == pytest.approx(expected.score, abs=1e-5)
        assert v.current_verdict == e.verdict == expected.verdict
        spans = spans_above_threshold(v.current_importance, tau, HOP)
        assert v.overlay.highlighted_spans_s == spans and len(spans) == len(e.spans)
        np.testing.assert_allclose(np.array(spans).reshape(-1, 2), [(s["start_s"], s["end_s"]) for s in e.spans] or
                                   np.zeros((0, 2)), atol=1e-6)

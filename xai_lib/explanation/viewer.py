"""The importance viewer: browse utterances, listen, see frame importance and the verdict.

An ipywidgets 8 panel for JupyterLab, built from plain Python objects so it can be
driven and checked without a browser (set widget values, read the state)::

    viewer = ImportanceViewer.from_detector(detector, items, importance_model=xai,
                                            thresholds={"saliency": 0.013},   # + xai.calibration
                                            save_dir=run_dir / "figures")
    viewer                      # last expression of a cell: displays viewer.widget
    viewer.method.value = "saliency"
    viewer.highlighted_frames   # (T,) bool, importance > threshold
    viewer.explain_file("clip.flac")   # what the "Explain file" button does

Widgets: an utterance picker (labels show utterance id, class, attack and detector
score), an audio player (autoplay off), a method picker, a scale toggle (absolute /
per-utterance min-max), a threshold slider, the verdict, the figure (an ``ipywidgets.Image``
holding the PNG bytes of an Agg-rendered :class:`matplotlib.figure.Figure`, so it renders in
any front end without ipympl and nothing is registered with pyplot), a "Save PNG" button,
a path box with an "Explain file" button and a status line.

The figure: the log-mel spectrogram with the importance drawn over it
(:func:`xai_lib.plots.plot_importance_overlay`: heat strip + line, ground-truth spoofed
spans hatched, frames above the threshold highlighted), the waveform, and, when a
``similarity_fn`` is given, the per-frame prototype similarities.

Scales: a method with a calibrated threshold tau (``thresholds``; the learned importance's
comes with its Stage-2 checkpoint) is drawn on its own **absolute** scale with tau as the
threshold (the slider moves it, a new utterance or method resets it to tau), so a frame is
flagged by the same rule as ``python -m xai_lib.explain``. The **per-utterance min-max**
scale (each utterance's attribution scaled to [0, 1], a constant one to 0; the slider a
threshold on that scale) is the toggle's other choice, and what a method without a
calibration is drawn on; the figure says which scale it shows. The raw values are kept in
:attr:`ImportanceViewer.current_raw_importance`. Attributions are computed lazily, once per
(utterance, method), and cached.

The verdict: ``spoof`` when the utterance's detector score is below ``score_threshold``
(the dev-EER threshold stored with the detector by ``stage1_report``; 0 when none is known).

Nothing here starts an event loop or calls ``plt.show()``: the viewer is safe under
papermill (the widget is simply not interactive in an executed copy).
"""
from __future__ import annotations

import html
import io
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as widgets
import numpy as np
import soundfile as sf
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xai_lib.plots import (
    ImportanceOverlay,
    as_1d,
    plot_importance_overlay,
    plot_prototype_similarity,
    plot_waveform,
)

__all__ = [
    "AttributeFn",
    "ExplainFn",
    "SimilarityFn",
    "SCALES",
    "ImportanceViewer",
    "minmax_normalize",
    "wav_bytes",
]

logger = logging.getLogger(__name__)

AttributeFn = Callable[[Mapping[str, Any], str], Any]
"""``attribute_fn(item, method) -> (T,)`` frame attribution of one utterance."""
ExplainFn = Callable[[str, str], Any]
"""``explain_fn(path, method) -> explanation`` with ``.wave`` (N,), ``.score`` (or None) and
``.frame_scores`` (T,) (an :class:`xai_lib.explain.Explanation`)."""
SCALES = (("absolute (calibrated τ)", "absolute"), ("per-utterance min-max", "minmax"))
SimilarityFn = Callable[[Mapping[str, Any]], tuple[Any, Any]]
"""``similarity_fn(item) -> (sim_bona (T,), sim_spoof (T,))`` prototype similarities."""

_REQUIRED_KEYS = ("utt_id", "wave")
_FIG_DPI = 100


# ----------------------------------------------------------------------------- helpers


def minmax_normalize(values: np.ndarray) -> np.ndarray:
    """Scale ``values`` to [0, 1] by their min and max; a constant array becomes all 0.

    Args:
        values: ``(T,)`` frame values.

    Returns:
        ``(T,)`` float64 array in [0, 1].
    """
    x = np.asarray(values, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV file bytes of a mono waveform (scaled down only if it would clip).

    Args:
        wave: ``(N,)`` float waveform, nominally in [-1, 1].
        sample_rate: sampling rate in Hz.

    Returns:
        The bytes of a complete WAV file.
    """
    x = np.asarray(wave, dtype=np.float32)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1.0:
        x = x / peak
    buf = io.BytesIO()
    sf.write(buf, x, int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _to_frames(values: Any, what: str) -> np.ndarray:
    """A 1-D finite float64 array from a numpy array / tensor / sequence, or a clear error."""
    return as_1d(values, f"{what} (T,)")


def _label_text(label: int | None, attack: str | None) -> str:
    if label is None:
        return "unlabelled"
    if int(label) == 1:
        return "bona fide"
    return f"spoof, {attack}" if attack and attack != "-" else "spoof"


def _score_text(score: float | None) -> str:
    return "score n/a" if score is None else f"score {score:+.3f}"


def _verdict_text(score: float | None, threshold: float, default: bool) -> tuple[str | None, str]:
    """``(verdict, text)``: ``spoof`` when ``score < threshold`` (None without a score)."""
    if score is None:
        return None, "verdict n/a (no detector score)"
    verdict = "spoof" if score < threshold else "bonafide"
    note = " (default threshold, none stored)" if default else ""
    return verdict, f"verdict {verdict.upper()} (score {score:+.3f} {'<' if verdict == 'spoof' else '≥'} {threshold:+.3f}{note})"


def _safe_name(text: str) -> str:
    """A file-name-safe version of an utterance id or method name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "item"


def _normalize_item(index: int, item: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one item dict and return a copy with a float32 (N,) numpy ``wave``."""
    if not isinstance(item, Mapping):
        raise TypeError(f"items[{index}] must be a dict with keys utt_id, wave, ...; got {type(item).__name__}.")
    missing = [k for k in _REQUIRED_KEYS if k not in item]
    if missing:
        raise ValueError(
            f"items[{index}] lacks the key(s) {missing}; every item needs 'utt_id' and 'wave' "
            "(optional: 'label', 'score', 'attack', 'spoof_spans_s')."
        )
    wave = item["wave"]
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        wave = np.squeeze(wave)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(
            f"items[{index}] ({item['utt_id']!r}): 'wave' must be a non-empty mono (N,) array, "
            f"got shape {np.shape(item['wave'])}."
        )
    label = item.get("label")
    if label is not None and int(label) not in (0, 1):
        raise ValueError(
            f"items[{index}] ({item['utt_id']!r}): 'label' must be 1 (bona fide), 0 (spoof) or None, got {label!r}."
        )
    score = item.get("score")
    spans = item.get("spoof_spans_s")
    out = dict(item)
    out.update(
        utt_id=str(item["utt_id"]),
        wave=wave,
        label=None if label is None else int(label),
        score=None if score is None else float(score),
        attack=item.get("attack"),
        spoof_spans_s=None if spans is None else [(float(s), float(e)) for s, e in spans],
    )
    return out


# ----------------------------------------------------------------------------- viewer


class ImportanceViewer:
    """Interactive per-utterance importance viewer (ipywidgets), testable without a browser.

    Args:
        items: utterances, each a dict ``{"utt_id": str, "wave": (N,) array, "label": 1 bona
            fide / 0 spoof / None, "score": detector score (bona fide logit) or None,
            "attack": str or None, "spoof_spans_s": [(start_s, end_s), ...] or None}``.
        attribute_fn: ``attribute_fn(item, method) -> (T,)`` frame attribution at
            ``frame_hop_s`` (numpy array or tensor); called at most once per
            (utterance, method).
        methods: method names offered in the method picker (first = initial choice).
        sample_rate: sampling rate of every ``wave``.
        frame_hop_s: seconds per attribution frame.
        similarity_fn: optional ``similarity_fn(item) -> (sim_bona (T,), sim_spoof (T,))``;
            adds a prototype-similarity row (cached per utterance).
        save_dir: where "Save PNG" writes ``viewer_<utt>_<method>.png``.
        threshold: initial threshold on the per-utterance min-max scale, in [0, 1].
        thresholds: ``{method: tau}``, calibrated thresholds on the methods' absolute scales;
            those methods are drawn absolute with tau by default.
        score_threshold: the verdict threshold on the detector score (``None``: 0, labelled as
            a default).
        explain_fn: ``explain_fn(path, method)`` for the "Explain file" button; default: read the
            file (:func:`xai_lib.data.audio.load_audio`) and call ``attribute_fn`` (no detector score).
        scale: initial scale, ``"absolute"`` or ``"minmax"`` (see :data:`SCALES`).

    Attributes:
        widget: the top-level ``VBox`` to display.
        utterance, method, scale, threshold, audio, image, save_button, path, explain_button,
            verdict, status: the widgets.
        figure: the :class:`~matplotlib.figure.Figure` last drawn (Agg; never shown).
        overlay: the :class:`~xai_lib.plots.ImportanceOverlay` of the last drawing.
        current_scale: ``"absolute"`` or ``"minmax"``, the scale drawn (a method without a
            calibration is drawn min-max whatever the toggle says).
        current_threshold: the threshold drawn, on that scale.
        current_verdict: ``"spoof"``, ``"bonafide"`` or ``None`` (no score).
        last_explanation: what the last "Explain file" returned.
        last_saved: path of the last PNG written, or ``None``.
        last_error: message of the last failure inside a widget callback, or ``None``.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        attribute_fn: AttributeFn,
        methods: Sequence[str],
        sample_rate: int = 16000,
        frame_hop_s: float = 0.02,
        similarity_fn: SimilarityFn | None = None,
        save_dir: str | Path = "figures",
        threshold: float = 0.5,
        thresholds: Mapping[str, float] | None = None,
        score_threshold: float | None = None,
        explain_fn: ExplainFn | None = None,
        scale: str = "absolute",
    ) -> None:
        items = list(items)
        if not items:
            raise ValueError("ImportanceViewer needs at least one item (utterance) to show; items is empty.")
        methods = [str(m) for m in methods]
        if not methods:
            raise ValueError("ImportanceViewer needs at least one attribution method; methods is empty.")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods contains duplicates: {methods}.")
        if not callable(attribute_fn):
            raise TypeError("attribute_fn must be callable as attribute_fn(item, method) -> (T,) array.")
        if sample_rate <= 0 or frame_hop_s <= 0:
            raise ValueError(f"sample_rate and frame_hop_s must be positive, got {sample_rate}, {frame_hop_s}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (per-utterance min-max scale), got {threshold}.")
        if scale not in dict(SCALES).values():
            raise ValueError(f"scale must be 'absolute' or 'minmax', got {scale!r}.")
        self.thresholds = {str(m): float(t) for m, t in (thresholds or {}).items() if t is not None}
        bad = [m for m, t in self.thresholds.items() if not np.isfinite(t)]
        if bad:
            raise ValueError(f"thresholds of {bad} are not finite numbers.")

        self._items: dict[str, dict[str, Any]] = {}
        for i, item in enumerate(items):
            norm = _normalize_item(i, item)
            if norm["utt_id"] in self._items:
                raise ValueError(f"items[{i}]: duplicate utt_id {norm['utt_id']!r}; utterance ids must be unique.")
            self._items[norm["utt_id"]] = norm

        self.attribute_fn = attribute_fn
        self.similarity_fn = similarity_fn
        self.explain_fn = explain_fn or self._read_and_attribute
        self.methods = methods
        self.sample_rate = int(sample_rate)
        self.frame_hop_s = float(frame_hop_s)
        self.save_dir = Path(save_dir)
        self.score_threshold_is_default = score_threshold is None
        self.score_threshold = 0.0 if score_threshold is None else float(score_threshold)

        self._attr_cache: dict[tuple[str, str], np.ndarray] = {}
        self._sim_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._audio_cache: dict[str, bytes] = {}
        self._minmax_threshold = float(threshold)
        self._syncing = False

        self.figure: Figure | None = None
        self.overlay: ImportanceOverlay | None = None
        self.current_raw_importance: np.ndarray | None = None
        self.current_importance: np.ndarray | None = None
        self.highlighted_frames: np.ndarray | None = None
        self.current_scale: str | None = None
        self.current_threshold: float | None = None
        self.current_verdict: str | None = None
        self.last_explanation: Any = None
        self.last_saved: Path | None = None
        self.last_error: str | None = None

        first = next(iter(self._items))
        self.utterance = widgets.Dropdown(
            options=self._utterance_options(), value=first, description="utterance",
            layout=widgets.Layout(width="60%"), style={"description_width": "initial"},
        )
        self.method = widgets.Dropdown(options=list(methods), value=methods[0], description="method")
        self.scale = widgets.ToggleButtons(options=list(SCALES), value=scale, description="scale",
                                           style={"button_width": "auto"})
        self.threshold = widgets.FloatSlider(
            value=float(threshold), min=0.0, max=1.0, step=0.01, description="threshold",
            continuous_update=False, readout_format=".3g", layout=widgets.Layout(width="50%"),
        )
        self.audio = widgets.Audio(
            value=self._audio_for(first), format="wav", autoplay=False, loop=False, controls=True
        )
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="100%", max_width="1000px"))
        self.save_button = widgets.Button(description="Save PNG", icon="save", tooltip="save the figure as PNG")
        self.path = widgets.Text(value="", placeholder="path/to/audio.flac", description="file",
                                 layout=widgets.Layout(width="60%"))
        self.explain_button = widgets.Button(description="Explain file", icon="search",
                                             tooltip="explain this audio file as python -m xai_lib.explain does")
        self.verdict = widgets.HTML(value="")
        self.status = widgets.HTML(value="")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.utterance, self.method]),
                widgets.HBox([self.scale, self.threshold, self.save_button]),
                widgets.HBox([self.path, self.explain_button]),
                self.verdict,
                self.audio,
                self.image,
                self.status,
            ]
        )

        self.utterance.observe(self._on_utterance, names="value")
        self.method.observe(self._on_selection, names="value")
        self.scale.observe(self._on_selection, names="value")
        self.threshold.observe(self._on_threshold, names="value")
        self.save_button.on_click(self._on_save)
        self.explain_button.on_click(self._on_explain)
        self._guarded(lambda: self.render(reset_threshold=True))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_detector(
        cls,
        detector: torch.nn.Module,
        items: Sequence[Mapping[str, Any]],
        importance_model: Any | None = None,
        methods: Sequence[str] | None = None,
        target: int = 0,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        similarity_fn: SimilarityFn | None = None,
        save_dir: str | Path = "figures",
        sample_rate: int = 16000,
        threshold: float = 0.5,
        thresholds: Mapping[str, float] | None = None,
        score_threshold: float | None = None,
    ) -> ImportanceViewer:
        """A viewer whose attributions come from :class:`xai_lib.explanation.methods.Attributor`.

        Items without a ``score`` are scored by ``detector`` (bona fide logit, eval mode,
        one utterance at a time). "Explain file" runs :class:`xai_lib.explain.Explainer`, the
        code of ``python -m xai_lib.explain``, with these models and thresholds.

        Args:
            detector: the frozen Stage-1 detector (never modified).
            items: utterance dicts as for :class:`ImportanceViewer`.
            importance_model: the Stage-2 model (needed for method ``"importance"``); its
                ``calibration["threshold"]`` is the importance's tau unless ``thresholds`` has one.
            methods: methods to offer; default: every method of
                :data:`xai_lib.explanation.methods.METHODS` (without ``"importance"`` when no
                ``importance_model`` is given).
            target: explained class, 0 = spoof, 1 = bona fide.
            method_options: per-method keyword options, e.g.
                ``{"integrated_gradients": {"n_steps": 20}}``.
            similarity_fn: optional prototype-similarity function (see the class).
            save_dir: directory for saved PNGs.
            sample_rate: sampling rate of the waves (16 kHz for the detector).
            threshold: initial threshold on the min-max scale.
            thresholds: ``{method: tau}`` calibrated thresholds (e.g. from
                :func:`xai_lib.explain.run_calibrations`); a method with a fixed threshold
                (``grad_cam_minmax05``: 0.5) gets that one unless given here.
            score_threshold: the verdict threshold; ``None``: the one stored with the detector.

        Raises:
            ValueError: an unknown method, ``"importance"`` without ``importance_model``.
        """
        from xai_lib.explain import Explainer, importance_calibration, score_threshold_of
        from xai_lib.explanation.methods import METHOD_REGISTRY, METHODS, Attributor

        if methods is None:
            methods = [m for m in METHODS if m != "importance" or importance_model is not None]
        methods = list(methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown attribution method(s) {unknown}; valid methods: {', '.join(METHODS)}.")
        if "importance" in methods and importance_model is None:
            raise ValueError(
                "method 'importance' needs the Stage-2 model: pass importance_model=... to "
                "ImportanceViewer.from_detector, or leave 'importance' out of methods."
            )
        options = {m: dict(o) for m, o in (method_options or {}).items()}
        attributor = Attributor(detector, importance_model=importance_model, sample_rate=sample_rate)
        taus = dict(thresholds or {})
        calibration = importance_calibration(importance_model)
        if calibration is not None:
            taus.setdefault("importance", float(calibration["threshold"]))
        for m in methods:  # a method that comes with its threshold (grad_cam_minmax05: 0.5 on its min-max scores)
            if METHOD_REGISTRY[m].fixed_threshold is not None:
                taus.setdefault(m, float(METHOD_REGISTRY[m].fixed_threshold))
        score_default = score_threshold is None
        if score_threshold is None:
            score_threshold, source = score_threshold_of(detector)
            score_default = source.startswith("default")

        def attribute_fn(item: Mapping[str, Any], method: str) -> np.ndarray:
            wave = torch.as_tensor(np.asarray(item["wave"], dtype=np.float32))[None, :]  # (1, N)
            att = attributor.attribute(wave, None, method=method, target=target, **options.get(method, {}))
            return att.per_utterance()[0]  # (T,)

        explainers: dict[str, Explainer] = {}

        def explain_fn(path: str, method: str) -> Any:
            if method not in explainers:
                explainers[method] = Explainer(detector, method, threshold=taus.get(method),
                                               importance_model=importance_model, score_threshold=score_threshold,
                                               method_options=options.get(method))
            return explainers[method](path)

        items = [_normalize_item(i, it) for i, it in enumerate(items)]
        unscored = [it for it in items if it["score"] is None]
        if unscored:
            device = attributor.device
            was_training = detector.training
            detector.eval()
            try:
                with torch.no_grad():
                    for it in unscored:
                        wave = torch.as_tensor(it["wave"], device=device)[None, :]  # (1, N)
                        it["score"] = float(detector(wave).logits[0, 1])
            finally:
                detector.train(was_training)
        return cls(
            items, attribute_fn, methods, sample_rate=sample_rate,
            frame_hop_s=attributor.frame_hop_s, similarity_fn=similarity_fn,
            save_dir=save_dir, threshold=threshold, thresholds=taus,
            score_threshold=None if score_default else score_threshold, explain_fn=explain_fn,
        )

    # ------------------------------------------------------------------ state

    @property
    def items(self) -> list[dict[str, Any]]:
        """The (validated) items, in picker order."""
        return list(self._items.values())

    @property
    def current_item(self) -> dict[str, Any]:
        """The item selected in the utterance picker."""
        return self._items[self.utterance.value]

    def option_label(self, item: Mapping[str, Any]) -> str:
        """Picker label of an item: ``"<utt_id> | <bona fide | spoof, attack> | score ±x.xxx"``."""
        return f"{item['utt_id']} | {_label_text(item.get('label'), item.get('attack'))} | {_score_text(item.get('score'))}"

    def _utterance_options(self) -> list[tuple[str, str]]:
        return [(self.option_label(it), uid) for uid, it in self._items.items()]

    def importance_for(self, utt_id: str, method: str) -> np.ndarray:
        """Raw ``(T,)`` attribution of one utterance and method (computed once, then cached)."""
        key = (utt_id, method)
        if key not in self._attr_cache:
            item = self._items[utt_id]
            values = _to_frames(self.attribute_fn(item, method), f"attribute_fn({utt_id!r}, {method!r})")
            duration = item["wave"].size / self.sample_rate
            if values.size * self.frame_hop_s > duration + 2 * self.frame_hop_s:
                logger.warning(
                    "attribution %s/%s has %d frames (%.2f s at %.3f s/frame) but the audio lasts %.2f s",
                    utt_id, method, values.size, values.size * self.frame_hop_s, self.frame_hop_s, duration,
                )
            self._attr_cache[key] = values
        return self._attr_cache[key]

    def _similarities_for(self, utt_id: str) -> tuple[np.ndarray, np.ndarray]:
        if utt_id not in self._sim_cache:
            bona, spoof = self.similarity_fn(self._items[utt_id])  # type: ignore[misc]
            self._sim_cache[utt_id] = (
                _to_frames(bona, f"similarity_fn({utt_id!r})[0] (sim_bona)"),
                _to_frames(spoof, f"similarity_fn({utt_id!r})[1] (sim_spoof)"),
            )
        return self._sim_cache[utt_id]

    def _audio_for(self, utt_id: str) -> bytes:
        if utt_id not in self._audio_cache:
            self._audio_cache[utt_id] = wav_bytes(self._items[utt_id]["wave"], self.sample_rate)
        return self._audio_cache[utt_id]

    # ------------------------------------------------------------------ thresholds

    def scale_for(self, method: str) -> str:
        """The scale ``method`` is drawn on: ``"absolute"`` when the toggle says so and it has a tau."""
        return "absolute" if self.scale.value == "absolute" and method in self.thresholds else "minmax"

    def _set_slider(self, lo: float, hi: float, value: float) -> None:
        """Range and value of the threshold slider without redrawing (widen first: min <= max always)."""
        if hi <= lo:
            hi = lo + 1.0
        self._syncing = True
        try:
            slider = self.threshold
            slider.min, slider.max = min(lo, slider.min), max(hi, slider.max)
            slider.value = float(value)
            slider.min, slider.max = lo, hi
            slider.step = (hi - lo) / 200.0
        finally:
            self._syncing = False

    # ------------------------------------------------------------------ drawing

    def render(self, reset_threshold: bool = False) -> Figure:
        """Recompute the state of the current selection, redraw the figure and the image.

        Args:
            reset_threshold: put the slider at the default of the selection (tau on the absolute
                scale, the last min-max threshold on the min-max scale) first.

        Returns:
            The new figure (also in :attr:`figure`).
        """
        item = self.current_item
        method = self.method.value
        raw = self.importance_for(item["utt_id"], method)  # (T,)
        scale = self.scale_for(method)
        if scale == "absolute":
            importance = raw
            tau = self.thresholds[method]
            if reset_threshold or self.current_scale != "absolute":
                self._set_slider(min(float(raw.min()), tau), max(float(raw.max()), tau), tau)
            label = f"{method} (absolute, τ = {tau:.3g})"
        else:
            importance = minmax_normalize(raw)  # (T,)
            if reset_threshold or self.current_scale != "minmax":
                self._set_slider(0.0, 1.0, self._minmax_threshold)
            label = f"{method} (per-utterance min-max)"
        threshold = float(self.threshold.value)
        sims = self._similarities_for(item["utt_id"]) if self.similarity_fn is not None else None
        verdict, verdict_text = _verdict_text(item["score"], self.score_threshold, self.score_threshold_is_default)

        n_rows = 3 if sims is not None else 2
        ratios = [2.2, 1.0, 1.0][:n_rows]
        fig = Figure(figsize=(10.0, 2.2 + 1.6 * (n_rows - 1)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(n_rows, 1, sharex=True, gridspec_kw={"height_ratios": ratios})
        spans = item["spoof_spans_s"]
        overlay = plot_importance_overlay(
            item["wave"], importance, frame_hop_s=self.frame_hop_s, sample_rate=self.sample_rate,
            ax=axes[0], spoof_spans_s=spans, threshold=threshold, label=label,
        )
        axes[0].set_xlabel("")
        plot_waveform(item["wave"], self.sample_rate, ax=axes[1], spoof_spans_s=spans)
        if sims is not None:
            axes[1].set_xlabel("")
            plot_prototype_similarity(sims[0], sims[1], frame_hop_s=self.frame_hop_s, ax=axes[2],
                                      spoof_spans_s=spans)
        duration = item["wave"].size / self.sample_rate
        axes[-1].set_xlim(0.0, max(duration, importance.size * self.frame_hop_s))
        fig.suptitle(
            f"{item['utt_id']}  |  {_label_text(item['label'], item['attack'])}  |  {verdict_text}\n"
            f"method: {label}  |  threshold {threshold:.3g}"
        )

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=_FIG_DPI)
        self.figure = fig
        self.overlay = overlay
        self.current_raw_importance = raw
        self.current_importance = importance
        self.current_scale = scale
        self.current_threshold = threshold
        self.current_verdict = verdict
        self.highlighted_frames = importance > threshold
        color = {"spoof": "#b00", "bonafide": "#070"}.get(verdict or "", "#555")
        self.verdict.value = f"<b style='color:{color}'>{html.escape(verdict_text)}</b>"
        self.image.value = buf.getvalue()
        return fig

    def default_save_path(self) -> Path:
        """``save_dir / viewer_<utt>_<method>.png`` for the current selection."""
        return self.save_dir / f"viewer_{_safe_name(self.utterance.value)}_{_safe_name(self.method.value)}.png"

    def save_png(self, path: str | Path | None = None) -> Path:
        """Write the current figure as PNG (parent directories created).

        Args:
            path: output file; ``None`` = :meth:`default_save_path`.

        Returns:
            The path written (also in :attr:`last_saved` and the status line).
        """
        if self.figure is None:
            self.render()
        path = Path(path) if path is not None else self.default_save_path()
        if path.suffix.lower() != ".png":
            raise ValueError(f"save_png writes PNG files; got the path {path} (use a .png suffix).")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, format="png", dpi=120)  # type: ignore[union-attr]
        self.last_saved = path
        self.status.value = f"Saved <code>{html.escape(str(path))}</code>"
        logger.info("Saved viewer figure %s", path)
        return path

    # ------------------------------------------------------------------ explain a file

    def _read_and_attribute(self, path: str, method: str) -> Any:
        """The default ``explain_fn``: the file's audio and ``attribute_fn`` (no detector score)."""
        from types import SimpleNamespace

        from xai_lib.data.audio import load_audio

        wave = load_audio(path, self.sample_rate)
        item = {"utt_id": str(path), "wave": wave, "label": None, "score": None, "attack": None, "spoof_spans_s": None}
        return SimpleNamespace(wave=wave, score=None, frame_scores=self.attribute_fn(item, method), method=method)

    def explain_file(self, path: str | Path | None = None) -> dict[str, Any]:
        """Explain an audio file with the current method and show it (the "Explain file" button).

        The file becomes an item of the utterance picker (id ``file:<path>``; explaining it again
        replaces it) and is selected; its frame scores are those of ``explain_fn``.

        Args:
            path: the file; ``None``: the path box's text.

        Returns:
            The new item.
        """
        path = str(path if path is not None else self.path.value).strip()
        if not path:
            raise ValueError("type the path of an audio file into the box first")
        method = self.method.value
        explanation = self.explain_fn(path, method)
        utt_id = f"file:{path}"
        item = _normalize_item(len(self._items), {
            "utt_id": utt_id, "wave": explanation.wave, "label": None, "attack": None, "spoof_spans_s": None,
            "score": getattr(explanation, "score", None),
        })
        self._items[utt_id] = item
        for key in [k for k in self._attr_cache if k[0] == utt_id]:
            del self._attr_cache[key]
        self._sim_cache.pop(utt_id, None)
        self._audio_cache.pop(utt_id, None)
        self._attr_cache[(utt_id, method)] = _to_frames(explanation.frame_scores, f"explain_fn({path!r}, {method!r})")
        self.last_explanation = explanation
        self._syncing = True
        try:
            current = self.utterance.value
            self.utterance.options = self._utterance_options()
            self.utterance.value = current
        finally:
            self._syncing = False
        if self.utterance.value == utt_id:
            self._on_utterance({"new": utt_id})
        else:
            self.utterance.value = utt_id  # redraws
        self.status.value = f"Explained <code>{html.escape(path)}</code> with {html.escape(method)}"
        return item

    # ------------------------------------------------------------------ callbacks

    def _guarded(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` from a widget callback: failures go to the status line and the log."""
        try:
            fn()
            self.last_error = None
        except Exception as err:  # noqa: BLE001 - a callback must not die silently in the browser
            self.last_error = f"{type(err).__name__}: {err}"
            self.status.value = f"<span style='color:#b00'>Error: {html.escape(self.last_error)}</span>"
            logger.exception("importance viewer: %s", self.last_error)

    def _on_utterance(self, change: Mapping[str, Any]) -> None:
        if self._syncing:
            return
        self.audio.value = self._audio_for(change["new"])
        self.status.value = ""
        self._guarded(lambda: self.render(reset_threshold=True))

    def _on_selection(self, change: Mapping[str, Any]) -> None:
        self._guarded(lambda: self.render(reset_threshold=True))

    def _on_threshold(self, change: Mapping[str, Any]) -> None:
        if self._syncing:
            return
        if self.current_scale == "minmax":
            self._minmax_threshold = float(change["new"])
        self._guarded(self.render)

    def _on_save(self, button: widgets.Button) -> None:
        self._guarded(self.save_png)

    def _on_explain(self, button: widgets.Button) -> None:
        self._guarded(self.explain_file)

    # ------------------------------------------------------------------ display

    def show(self) -> None:
        """Display :attr:`widget` in the running notebook."""
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Display as the widget when the viewer is a cell's last expression."""
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return (
            f"ImportanceViewer({len(self._items)} utterances, methods={self.methods}, "
            f"current={self.utterance.value!r}/{self.method.value!r})"
        )

"""Explain audio files: the detector's verdict and the time spans that made it, as files.

Command line::

    python -m xai_lib.explain AUDIO_OR_DIR... --run RUN_DIR [--out DIR] [--method NAME]
                              [--false-flag-rate A] [--device DEV]

Python (the module itself is callable)::

    import xai_lib
    e = xai_lib.explain("clip.flac", run_dir="outputs/demo")   # = xai_lib.explain.explain(...)
    e.verdict                   # "spoof" | "bonafide"
    e.spans                     # [{"start_s", "end_s", "peak", "mean"}, ...]
    e.plot()                    # matplotlib Figure (never shown)
    e.save("out/")              # out/clip.json .txt .rttm .csv .png

What it computes, for one file:

* the **verdict**: ``"spoof"`` when the detector's utterance score (the bona fide logit, as in
  ``RUN/scores/*_scores.txt``) is below the verdict threshold stored in
  ``stage1_detector.pth`` by ``stage1_report`` (the dev-EER operating point, ``extra.score_threshold``);
  a checkpoint without one (a published state dict) uses 0 and says so;
* one **frame score** per detector frame (20 ms) from ``--method`` (default: the learned
  Stage-2 importance), on the method's own absolute scale (never min-max per utterance);
* the **spans**: maximal runs of frames scoring above the method's calibrated threshold tau
  (label-free: the frame-score quantile of bona fide speech at the false-flag rate alpha; for
  ``importance`` from the Stage-2 checkpoint, for the baselines from
  ``RUN/metrics.json["stage3"]["methods"][NAME]["calibrated"]``).

Files longer than :data:`CHUNK_S` seconds are processed in consecutive chunks laid on the
detector's frame grid (each chunk carries the few extra samples its last frame needs), so
memory stays bounded and every frame of the file gets exactly one score; the utterance score of
such a file is the mean of the chunk scores weighted by their frame counts (as
``score_utterances`` does with ``data.max_eval_seconds``).

For the learned importance the detector's front end runs once per chunk for both the verdict
and the importance (the SSL features feed the back end and, without ``xai.context_s``, the
XAI module); a baseline method needs its own passes.

Products per input, in ``--out`` (default ``RUN/explanations/``): ``<name>.json`` (verdict,
scores, thresholds, spans), ``<name>.txt`` (an Audacity label track), ``<name>.rttm`` (spans as
``spoof`` segments), ``<name>.csv`` (``time_s,score`` per frame) and ``<name>.png`` (log-mel
spectrogram with the frame scores, tau and the spans). ``<name>`` is the file's path
relative to the directory given (``/`` -> ``__``) without its suffix, made unique.
Exit status: 0, 1 when an input could not be explained (the others still are), 2 for usage
errors.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from xai_lib.console import say, say_error
from xai_lib.cpu import keep_freed_memory
from xai_lib.data.audio import AudioError, load_audio
from xai_lib.data.protocols import AUDIO_EXTENSIONS
from xai_lib.files import atomic_write_text

__all__ = [
    "CHUNK_S",
    "OUTPUT_SUFFIXES",
    "JSON_KEYS",
    "ExplainError",
    "InputError",
    "Explanation",
    "Explainer",
    "explain",
    "score_threshold_of",
    "verdict_of",
    "frame_spans",
    "run_calibrations",
    "importance_calibration",
    "resolve_threshold",
    "collect_inputs",
    "main",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
#: Files longer than this (seconds) are processed in chunks of this length.
CHUNK_S = 30.0
#: The files written per input.
OUTPUT_SUFFIXES = (".json", ".txt", ".rttm", ".csv", ".png")
#: The keys of ``<name>.json``.
JSON_KEYS = ("file", "duration_s", "verdict", "score", "score_threshold", "method", "threshold", "frame_hop_s", "spans")
DEFAULT_THRESHOLD_SOURCE = "default 0 (no dev threshold stored)"


class ExplainError(ValueError):
    """The run or the request cannot be used (no Stage-2 model, no calibration, unknown method): exit 2."""


class InputError(ValueError):
    """One input cannot be explained (unreadable, empty, NaN, too short); the message names it."""


# ----------------------------------------------------------------------------- small pieces


def score_threshold_of(detector: torch.nn.Module) -> tuple[float, str]:
    """The verdict threshold stored with the detector and where it came from.

    Returns:
        ``(threshold, source)``: ``extra["score_threshold"]`` of the checkpoint the detector was
        loaded from (written by ``stage1_report``), else ``(0.0, "default 0 (no dev threshold stored)")``.
    """
    extra = getattr(getattr(detector, "load_report", None), "extra", None) or {}
    if extra.get("score_threshold") is None:
        return 0.0, DEFAULT_THRESHOLD_SOURCE
    return float(extra["score_threshold"]), str(extra.get("score_threshold_source", "stored"))


def verdict_of(score: float, threshold: float) -> str:
    """``"spoof"`` when ``score`` (higher = more bona fide) is below ``threshold``, else ``"bonafide"``."""
    return "spoof" if score < threshold else "bonafide"


def frame_spans(scores: np.ndarray, threshold: float, frame_hop_s: float) -> list[dict[str, float]]:
    """Maximal runs of frames with ``score > threshold``.

    Args:
        scores: ``(T,)`` frame scores; frame ``t`` covers ``[t * hop, (t + 1) * hop]`` seconds.
        threshold: strict lower bound.
        frame_hop_s: seconds per frame.

    Returns:
        ``[{"start_s", "end_s", "peak", "mean"}, ...]`` in time order (peak/mean of the run's scores).
    """
    from xai_lib.plots import spans_above_threshold

    scores = np.asarray(scores, dtype=np.float64)
    out = []
    for start, end in spans_above_threshold(scores, threshold, frame_hop_s):
        run = scores[int(round(start / frame_hop_s)) : int(round(end / frame_hop_s))]
        out.append({"start_s": round(start, 6), "end_s": round(end, 6), "peak": float(run.max()), "mean": float(run.mean())})
    return out


def run_calibrations(run_dir: str | Path, importance_model: Any | None = None) -> dict[str, dict[str, Any]]:
    """Every frame-threshold calibration a run holds: ``{method: {"threshold", "false_flag_rate", ...}}``.

    ``importance`` from ``importance_model.calibration`` (the Stage-2 checkpoint), the baselines from
    ``run_dir/metrics.json["stage3"]["methods"][NAME]["calibrated"]``.
    """
    found: dict[str, dict[str, Any]] = {}
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.is_file():
        try:
            methods = json.loads(metrics_path.read_text()).get("stage3", {}).get("methods", {})
        except (OSError, ValueError) as exc:
            logger.warning("%s unreadable (%s): no Stage-3 calibrations", metrics_path, exc)
            methods = {}
        for name, entry in methods.items():
            cal = entry.get("calibrated") if isinstance(entry, Mapping) else None
            if isinstance(cal, Mapping) and cal.get("threshold") is not None:
                found[name] = dict(cal)
    cal = importance_calibration(importance_model)
    if cal is not None:
        found["importance"] = cal
    return found


def importance_calibration(importance_model: Any | None) -> dict[str, Any] | None:
    """The learned importance's calibration: ``importance_model.calibration`` (else the checkpoint's
    ``extra["calibration"]``) when it holds a ``threshold``, else ``None``."""
    if importance_model is None:
        return None
    cal = getattr(importance_model, "calibration", None)
    if cal is None:  # a checkpoint written before LoadedXAI carried it
        cal = (getattr(importance_model, "extra", None) or {}).get("calibration")
    return dict(cal) if isinstance(cal, Mapping) and cal.get("threshold") is not None else None


def resolve_threshold(calibration: Mapping[str, Any], false_flag_rate: float | None, what: str) -> tuple[float, float | None]:
    """tau for the false-flag rate ``false_flag_rate`` (``None``: the stored one).

    Args:
        calibration: ``{"threshold", "false_flag_rate", "bonafide_quantiles": {"0.01": tau, ...}?}``.
        false_flag_rate: the wanted alpha.
        what: the calibration's name, for errors.

    Returns:
        ``(tau, alpha)``.

    Raises:
        ExplainError: an alpha the calibration holds no threshold for (the message lists those it has).
    """
    stored = calibration.get("false_flag_rate")
    if false_flag_rate is None or (stored is not None and math.isclose(float(stored), false_flag_rate, rel_tol=1e-6)):
        return float(calibration["threshold"]), None if stored is None else float(stored)
    quantiles = calibration.get("bonafide_quantiles") or {}
    for key, tau in quantiles.items():
        if math.isclose(float(key), false_flag_rate, rel_tol=1e-6):
            return float(tau), float(false_flag_rate)
    have = sorted({float(k) for k in quantiles} | ({float(stored)} if stored is not None else set()))
    raise ExplainError(f"{what} holds no threshold for false-flag rate {false_flag_rate:g}; available: "
                       f"{', '.join(f'{a:g}' for a in have) or 'none'}")


def _as_wave(wave: Any, sample_rate: int | None) -> np.ndarray:
    """A (N,) float32 16 kHz waveform from a numpy array / tensor at ``sample_rate``."""
    if sample_rate is None:
        raise ExplainError("a waveform needs its sample_rate (e.g. explain(wave, run_dir, sample_rate=16000))")
    from xai_lib.plots import as_1d

    try:
        x = as_1d(wave, "<waveform> (a mono (N,) waveform)").astype(np.float32)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if int(sample_rate) != SAMPLE_RATE:
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), int(sample_rate), SAMPLE_RATE).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- the result


@dataclass
class Explanation:
    """The explanation of one input (what :func:`explain` returns).

    Attributes:
        file: the input path as given, or ``"<waveform>"``.
        name: base name of the output files.
        duration_s: length of the audio in seconds.
        verdict: ``"spoof"`` or ``"bonafide"``.
        score: the detector's utterance score (bona fide logit; higher = more bona fide).
        score_threshold: the verdict threshold (spoof when ``score < score_threshold``).
        score_threshold_source: where it came from (``"dev EER"``, or the default 0).
        method: the attribution method of the frame scores.
        threshold: tau, the calibrated frame-score threshold (``None``: none known, no spans).
        false_flag_rate: the alpha tau was calibrated for.
        frame_hop_s: seconds per frame.
        frame_scores: ``(T,)`` float32 frame scores on the method's absolute scale.
        spans: ``[{"start_s", "end_s", "peak", "mean"}, ...]``, the runs of frames above tau.
        wave: ``(N,)`` float32 audio at ``sample_rate``.
        sample_rate: 16000.
        seconds: wall time of the computation.
    """

    file: str
    name: str
    duration_s: float
    verdict: str
    score: float
    score_threshold: float
    score_threshold_source: str
    method: str
    threshold: float | None
    false_flag_rate: float | None
    frame_hop_s: float
    frame_scores: np.ndarray = field(repr=False)
    spans: list[dict[str, float]]
    wave: np.ndarray = field(repr=False)
    sample_rate: int = SAMPLE_RATE
    seconds: float = 0.0

    def frame_times(self) -> np.ndarray:
        """``(T,)`` start time in seconds of every frame."""
        return np.arange(self.frame_scores.size) * self.frame_hop_s

    def to_dict(self) -> dict[str, Any]:
        """The content of ``<name>.json`` (keys :data:`JSON_KEYS`)."""
        return {"file": self.file, "duration_s": round(self.duration_s, 6), "verdict": self.verdict,
                "score": self.score, "score_threshold": self.score_threshold, "method": self.method,
                "threshold": self.threshold, "frame_hop_s": self.frame_hop_s, "spans": self.spans}

    def summary(self) -> str:
        """One line: ``a.wav: spoof (score -3.21 < -0.54), 2 spans: 0.42-1.10 s, 2.00-2.36 s``."""
        sign = "<" if self.verdict == "spoof" else ">="
        default = "; verdict threshold: default 0, none stored" if self.score_threshold_source == DEFAULT_THRESHOLD_SOURCE else ""
        if self.threshold is None:
            spans = "no calibrated threshold, no spans"
        elif not self.spans:
            spans = "no span"
        else:
            spans = (f"{len(self.spans)} span{'s' if len(self.spans) > 1 else ''}: "
                     + ", ".join(f"{s['start_s']:.2f}-{s['end_s']:.2f} s" for s in self.spans))
        return f"{self.file}: {self.verdict} (score {self.score:.2f} {sign} {self.score_threshold:.2f}{default}), {spans}"

    def plot(self, ax: Any = None) -> Any:
        """The log-mel spectrogram with the frame scores, tau and the spans; the verdict in the title.

        Args:
            ax: axes to draw on; ``None``: a new Agg :class:`matplotlib.figure.Figure` (nothing is
                registered with pyplot, nothing is shown).

        Returns:
            The :class:`matplotlib.figure.Figure`.
        """
        from xai_lib.plots import plot_importance_overlay

        if ax is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(10.0, 3.8), layout="constrained")
            FigureCanvasAgg(fig)
            ax = fig.subplots()
        plot_importance_overlay(self.wave, self.frame_scores, frame_hop_s=self.frame_hop_s, sample_rate=self.sample_rate,
                                ax=ax, threshold=self.threshold, label=f"{self.method} (absolute)")
        sign = "<" if self.verdict == "spoof" else "≥"
        tau = "" if self.threshold is None else (
            f"; {len(self.spans)} span(s) above τ = {self.threshold:.3g}"
            + ("" if self.false_flag_rate is None else f" (false-flag rate {self.false_flag_rate:g})"))
        default = ", default threshold" if self.score_threshold_source == DEFAULT_THRESHOLD_SOURCE else ""
        name = Path(str(self.file)).name or str(self.file)  # the file name: a long path would be cut off
        ax.set_title(f"{name}: {self.verdict.upper()} (score {self.score:+.2f} {sign} {self.score_threshold:+.2f}"
                     f"{default}){tau}",
                     fontsize="medium", wrap=True)
        return ax.figure

    def save(self, out_dir: str | Path, name: str | None = None) -> list[Path]:
        """Write ``<name>.json``, ``.txt`` (Audacity labels), ``.rttm``, ``.csv`` and ``.png`` into ``out_dir``.

        Returns:
            The five paths, in the order of :data:`OUTPUT_SUFFIXES`.
        """
        from xai_lib.plots import save_figure

        out_dir = Path(out_dir)
        base = out_dir / (name or self.name)
        file_id = "_".join((name or self.name).split()) or "audio"
        labels = "".join(f"{s['start_s']:.3f}\t{s['end_s']:.3f}\tspoof (peak {s['peak']:.2f})\n" for s in self.spans)
        rttm = "".join(f"SPEAKER {file_id} 1 {s['start_s']:.3f} {s['end_s'] - s['start_s']:.3f} <NA> <NA> spoof <NA> <NA>\n"
                       for s in self.spans)
        csv = "time_s,score\n" + "".join(f"{t:.3f},{v:.6g}\n" for t, v in zip(self.frame_times(), self.frame_scores))
        paths = [atomic_write_text(base.with_name(base.name + ".json"), json.dumps(self.to_dict(), indent=2) + "\n"),
                 atomic_write_text(base.with_name(base.name + ".txt"), labels),
                 atomic_write_text(base.with_name(base.name + ".rttm"), rttm),
                 atomic_write_text(base.with_name(base.name + ".csv"), csv)]
        paths.append(save_figure(self.plot(), base.with_name(base.name + ".png")))
        return paths


# ----------------------------------------------------------------------------- the explainer


class Explainer:
    """Verdict + frame scores + spans of audio, with loaded models (the command's and the viewer's code).

    Args:
        detector: the frozen Stage-1 detector (eval mode; never modified).
        method: one of :data:`xai_lib.explanation.methods.METHODS`.
        threshold: tau on the method's frame scores (``None``: no spans).
        false_flag_rate: the alpha of ``threshold`` (reported only).
        importance_model: the Stage-2 model (a ``LoadedXAI``), needed for ``method="importance"``.
        score_threshold: the verdict threshold; ``None``: the detector's stored one (:func:`score_threshold_of`).
        chunk_s: longer inputs are processed in chunks of this many seconds.
        method_options: keyword options of a baseline method (e.g. ``{"n_steps": 20}``).
    """

    def __init__(
        self,
        detector: torch.nn.Module,
        method: str = "importance",
        threshold: float | None = None,
        false_flag_rate: float | None = None,
        importance_model: Any | None = None,
        score_threshold: float | None = None,
        chunk_s: float = CHUNK_S,
        method_options: Mapping[str, Any] | None = None,
    ) -> None:
        from xai_lib.explanation.methods import METHODS, Attributor

        if method not in METHODS:
            raise ExplainError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        if method == "importance" and importance_model is None:
            raise ExplainError("method 'importance' needs the Stage-2 model (importance_model=load_xai(...))")
        self.detector = detector.eval()
        self.method = method
        self.threshold = None if threshold is None else float(threshold)
        self.false_flag_rate = false_flag_rate
        self.importance_model = importance_model
        if score_threshold is None:
            self.score_threshold, self.score_threshold_source = score_threshold_of(detector)
        else:
            self.score_threshold, self.score_threshold_source = float(score_threshold), "given"
        self.frame_hop_s = float(detector.frame_hop_s)
        self.chunk_frames = max(1, int(round(chunk_s / self.frame_hop_s)))
        self.method_options = dict(method_options or {})
        self.attributor = Attributor(detector, importance_model=importance_model)
        module = getattr(importance_model, "module", None)
        if isinstance(module, torch.nn.Module):
            module.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        method: str = "importance",
        false_flag_rate: float | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> Explainer:
        """The models and calibration of a run directory.

        Raises:
            ExplainError: no such run, no Stage-2 model for ``importance``, an unknown method,
                no calibration for the method, or none for ``false_flag_rate``.
            CheckpointError: an unreadable checkpoint.
        """
        from xai_lib.detector.checkpoint import load_detector
        from xai_lib.explanation.methods import METHODS

        keep_freed_memory()  # many files through the same models: reuse their activations' memory
        run = Path(run_dir)
        if not run.is_dir():
            raise ExplainError(f"run directory not found: {run}")
        if method not in METHODS:
            raise ExplainError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        if not (run / "stage1_detector.pth").is_file():
            raise ExplainError(f"No Stage 1 detector in {run} (stage1_detector.pth): train Stage 1 first "
                               f"(notebook 01 or `python -m xai_lib.pipeline --stage1 --run-dir {run}`)")
        if method == "importance" and not (run / "stage2_xai.pth").is_file():
            raise ExplainError(f"No Stage 2 model in {run} (stage2_xai.pth): train Stage 2 first (notebook 02 or "
                               f"`python -m xai_lib.pipeline --stage2 --run-dir {run}`), or pick a baseline --method")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        detector = load_detector(run / "stage1_detector.pth").to(device)
        xai = None
        if method == "importance":
            from xai_lib.importance.checkpoint import load_xai

            xai = load_xai(run / "stage2_xai.pth", detector=detector)
        calibration = run_calibrations(run, xai).get(method)
        if calibration is None:
            where = ("the Stage-2 checkpoint (stage2_xai.pth): re-run Stage 2 (notebook 02 or `python -m xai_lib.pipeline "
                     f"--stage2 --run-dir {run}`)" if method == "importance" else
                     f"metrics.json[stage3][methods][{method}][calibrated]: run Stage 3 (notebook 03 or "
                     f"`python -m xai_lib.pipeline --stage3 --run-dir {run}`) with method {method}")
            raise ExplainError(f"No calibrated frame threshold for {method} in {run}; it is stored in {where}")
        tau, alpha = resolve_threshold(calibration, false_flag_rate, f"the {method} calibration of {run}")
        return cls(detector, method, threshold=tau, false_flag_rate=alpha, importance_model=xai, **kwargs)

    # ------------------------------------------------------------------ computation

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """Sample ranges of consecutive chunks on the frame grid; together they give every frame once."""
        hop, span = self.detector.frame_hop_samples, self.detector.min_input_samples
        step = self.chunk_frames * hop
        return [(s, min(n, s + step + span - hop)) for s in range(0, n, step) if min(n, s + step + span - hop) - s >= span]

    @torch.no_grad()
    def _importance_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Learned importance (T,) and the detector's score of one chunk (1, L), one front-end pass."""
        from xai_lib.importance.inference import LoadedXAI, context_options, extract_representation

        xai, det = self.importance_model, self.detector
        if not isinstance(xai, LoadedXAI):  # any ImportanceModel: two passes
            return xai.frame_importance(det, x, None)[0], float(det(x).scores[0])
        if xai.config.context_s is None:
            ssl, mask = det.frontend(x)  # (1, T, D_ssl), (1, T)
            out = det.backend(ssl)
            h = ssl if xai.representation == "ssl" else out.frame_tokens
        else:  # the verdict's pass and the local context share the conv encoder where they can
            h, ssl, mask = extract_representation(det, x, None, xai.representation, full_features=True,
                                                  **context_options(xai.config))
            out = det.backend(ssl)
        param = next(xai.module.parameters())
        return xai.module(h.to(param.dtype), mask).importance[0], float(out.logits[0, 1])

    def _baseline_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        att = self.attributor.attribute(x, None, method=self.method, target=0, **self.method_options)
        with torch.no_grad():
            score = float(self.detector(x).scores[0])
        return att.scores[0], score

    def frame_scores(self, wave: np.ndarray) -> tuple[np.ndarray, float]:
        """Frame scores and utterance score of a (N,) 16 kHz waveform (in chunks when long).

        Returns:
            ``scores``: ``(T,)`` float32, T = the detector's frame count for N samples;
            ``score``: the utterance score (chunks: mean weighted by frame count).
        """
        x = torch.as_tensor(wave, dtype=torch.float32)
        pieces, scores, weights = [], [], []
        for s, e in self._chunks(x.numel()):
            chunk = x[s:e][None].to(self.device)  # (1, L)
            w, score = (self._importance_chunk if self.method == "importance" else self._baseline_chunk)(chunk)
            pieces.append(w.detach().float().cpu().numpy())
            scores.append(score)
            weights.append(pieces[-1].size)
        frames = np.concatenate(pieces).astype(np.float32)
        expected = int(self.detector.num_frames(torch.tensor([x.numel()]))[0])
        if frames.size != expected:  # the chunk arithmetic guarantees it; never silently misalign
            raise RuntimeError(f"chunked frame count {frames.size} != the detector's {expected} for {x.numel()} samples")
        return frames, float(np.average(scores, weights=weights))

    def __call__(self, source: str | Path | np.ndarray | torch.Tensor, sample_rate: int | None = None,
                 name: str | None = None) -> Explanation:
        """Explain an audio file or a waveform.

        Args:
            source: a file path (any format libsndfile reads; resampled to 16 kHz, downmixed), or a
                (N,) numpy/torch waveform at ``sample_rate``.
            sample_rate: the waveform's rate (required for a waveform, ignored for a file).
            name: base name of the output files (default: the file's stem, or ``"waveform"``).

        Raises:
            InputError: unreadable, empty, non-finite or shorter than one detector frame.
        """
        t0 = time.perf_counter()
        if isinstance(source, (str, Path)):
            label = str(source)
            try:
                wave = load_audio(source, SAMPLE_RATE)
            except AudioError as exc:
                raise InputError(f"{source}: {exc.reason}") from None
            name = name or Path(source).stem
        else:
            label, wave, name = "<waveform>", _as_wave(source, sample_rate), name or "waveform"
        need = self.detector.min_input_samples
        if wave.size < need:
            raise InputError(f"{label}: too short ({wave.size} samples = {1000 * wave.size / SAMPLE_RATE:.1f} ms); "
                             f"the detector needs at least {need} samples ({1000 * need / SAMPLE_RATE:.0f} ms)")
        frames, score = self.frame_scores(wave)
        spans = [] if self.threshold is None else frame_spans(frames, self.threshold, self.frame_hop_s)
        return Explanation(
            file=label, name=name, duration_s=wave.size / SAMPLE_RATE, verdict=verdict_of(score, self.score_threshold),
            score=score, score_threshold=self.score_threshold, score_threshold_source=self.score_threshold_source,
            method=self.method, threshold=self.threshold, false_flag_rate=self.false_flag_rate,
            frame_hop_s=self.frame_hop_s, frame_scores=frames, spans=spans, wave=wave,
            seconds=time.perf_counter() - t0,
        )


# ----------------------------------------------------------------------------- API


_CACHE: dict[tuple, Explainer] = {}


def _run_key(run: Path, method: str, false_flag_rate: float | None, device: Any) -> tuple:
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                   for p in (run / "stage1_detector.pth", run / "stage2_xai.pth", run / "metrics.json"))
    return (str(run.resolve()), method, false_flag_rate, str(device), stamps)


def explain(
    path_or_wave: str | Path | np.ndarray | torch.Tensor,
    run_dir: str | Path,
    method: str = "importance",
    false_flag_rate: float | None = None,
    sample_rate: int | None = None,
    device: str | torch.device | None = None,
) -> Explanation:
    """Explain one audio file or waveform with the models of a run directory.

    The loaded models are kept for the next call with the same run, method and alpha
    (reloaded when the run's checkpoints change).

    Args:
        path_or_wave: an audio file, or a (N,) numpy/torch waveform (then ``sample_rate`` is required).
        run_dir: the run directory (``stage1_detector.pth``, ``stage2_xai.pth``, ``metrics.json``).
        method: ``"importance"`` (the learned Stage-2 importance) or a baseline of
            :data:`xai_lib.explanation.methods.METHODS`.
        false_flag_rate: alpha of the frame threshold; ``None``: the calibrated one.
        sample_rate: the waveform's rate.
        device: ``None``: CUDA when available, else CPU.

    Returns:
        :class:`Explanation` (``.verdict``, ``.spans``, ``.plot()``, ``.save(dir)``).

    Raises:
        ExplainError: the run cannot explain with ``method`` (the message says what to run).
        InputError: the audio cannot be used.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ExplainError(f"run directory not found: {run}")
    key = _run_key(run, method, false_flag_rate, device)
    if key not in _CACHE:
        _CACHE.clear()  # one run's models at a time
        _CACHE[key] = Explainer.from_run(run, method, false_flag_rate, device)
    return _CACHE[key](path_or_wave, sample_rate=sample_rate)


# ----------------------------------------------------------------------------- command line


def collect_inputs(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """The audio files of files and directories (recursively), each with a unique output name.

    A directory contributes its files with a suffix of
    :data:`xai_lib.data.protocols.AUDIO_EXTENSIONS`, named by their path relative to it
    (``sub/a.wav`` -> ``sub__a``); a file is taken as given, named by its stem. A name that is
    already taken gets ``__2``, ``__3``, ...

    Returns:
        ``[(path, name), ...]`` and the problems (a path that does not exist).
    """
    found: list[tuple[Path, str]] = []
    problems: list[str] = []
    for arg in map(Path, paths):
        if arg.is_dir():
            files = sorted(p for p in arg.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            found += [(p, "__".join(p.relative_to(arg).with_suffix("").parts)) for p in files]
        elif arg.exists():
            found.append((arg, arg.stem))
        else:
            problems.append(f"{arg}: no such file or directory")
    taken: set[str] = set()
    unique = []
    for path, name in found:
        base, k = name or "audio", 1
        while name in taken or not name:
            k += 1
            name = f"{base}__{k}"
        taken.add(name)
        unique.append((path, name))
    return unique, problems


def build_parser() -> argparse.ArgumentParser:
    from xai_lib.explanation.methods import METHODS

    p = argparse.ArgumentParser(
        prog="python -m xai_lib.explain",
        description="The detector's verdict on audio files and the time spans that made it: per file "
                    "<name>.json, .txt (Audacity labels), .rttm, .csv (frame scores) and .png in --out.",
    )
    p.add_argument("inputs", nargs="+", metavar="AUDIO_OR_DIR", help="audio files, or directories searched recursively "
                   f"for {', '.join(AUDIO_EXTENSIONS)} files")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory (stage1_detector.pth, stage2_xai.pth)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: RUN_DIR/explanations)")
    p.add_argument("--method", default="importance", choices=METHODS,
                   help="frame scores: the learned Stage-2 importance (default) or a baseline calibrated by Stage 3")
    p.add_argument("--false-flag-rate", type=float, metavar="A",
                   help="alpha of the frame threshold (default: the calibrated one)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m xai_lib.explain``; returns the exit status (0, 1 some input failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    inputs, problems = collect_inputs(args.inputs)
    if not inputs and not problems:
        say_error(f"error: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {' '.join(args.inputs)}")
        return 2
    try:
        explainer = Explainer.from_run(args.run, args.method, args.false_flag_rate, args.device)
    except ExplainError as exc:
        say_error(f"error: {exc}")
        return 2
    except (OSError, RuntimeError) as exc:  # CheckpointError is a RuntimeError
        say_error(f"error: {exc}")
        return 2
    out = Path(args.out) if args.out else Path(args.run) / "explanations"
    if explainer.score_threshold_source == DEFAULT_THRESHOLD_SOURCE:
        say(f"note: {Path(args.run) / 'stage1_detector.pth'} stores no verdict threshold (run stage1_report); "
            "spoof means score < 0")
    for problem in problems:
        say_error(problem)
    failed = len(problems)
    for path, name in inputs:
        try:
            e = explainer(path, name=name)
            e.save(out)
        except (InputError, ValueError, RuntimeError) as exc:
            say_error(str(exc) if isinstance(exc, InputError) else f"{path}: failed ({type(exc).__name__}: {exc})")
            logger.debug("explaining %s failed", path, exc_info=True)
            failed += 1
            continue
        say(e.summary())
    if failed:
        say_error(f"{failed} of {len(inputs) + len(problems)} inputs could not be explained")
    return 1 if failed else 0


class _CallableModule(types.ModuleType):
    """``xai_lib.explain`` is this module and, called, :func:`explain`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Plot helpers for detection results and frame-level explanations.

Every helper draws on a given ``ax=`` (a new figure is created when it is ``None``) or
returns a :class:`~matplotlib.figure.Figure`; none calls ``plt.show()``, so they run
under Agg in batch notebooks and tests. Save with :func:`save_figure` (PNG, closes the
figure).

Time axes are in seconds. Frame-level series (importance, similarities) at hop
``frame_hop_s`` cover ``[0, T * frame_hop_s]``: frame ``t`` spans
``[t * hop, (t + 1) * hop]`` and line plots put its value at the frame centre.

Example::

    overlay = plot_importance_overlay(wave, importance, frame_hop_s=0.02,
                                      spoof_spans_s=[(1.2, 1.9)], threshold=0.5)
    save_figure(overlay.figure, run_dir / "figures" / "overlay.png")
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D

from xai_lib.detector.metrics import compute_det_curve, utterance_eer

__all__ = [
    "as_1d",
    "ImportanceOverlay",
    "compute_spectrogram",
    "plot_spectrogram",
    "plot_importance_overlay",
    "plot_waveform",
    "plot_prototype_similarity",
    "plot_method_comparison",
    "plot_deletion_insertion",
    "plot_det_curve",
    "plot_score_histogram",
    "plot_loss_curves",
    "plot_similarity_distributions",
    "spans_above_threshold",
    "save_figure",
]

logger = logging.getLogger(__name__)

_BONA_COLOR = "tab:blue"
_SPOOF_COLOR = "tab:red"
_SPAN_COLOR = "tab:orange"


# ----------------------------------------------------------------------------- helpers


def as_1d(x: object, name: str) -> np.ndarray:
    """``x`` (array, tensor, list) as a finite, non-empty 1-D float64 array (size-1 axes squeezed);
    ``ValueError`` naming ``name`` otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        arr = np.squeeze(arr)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {np.shape(x)}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN/inf values.")
    return arr


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = (8.0, 3.0)) -> Axes:
    if ax is not None:
        return ax
    fig, new_ax = plt.subplots(figsize=figsize, layout="constrained")
    return new_ax


def _shade_spans(ax: Axes, spans_s: Sequence[tuple[float, float]] | None, label: str) -> None:
    """Shade ground-truth spoofed spans ``[(start_s, end_s), ...]`` on ``ax``."""
    for i, (start, end) in enumerate(spans_s or []):
        if end < start:
            raise ValueError(f"spoof span {i} ends before it starts: ({start}, {end}).")
        ax.axvspan(
            start, end, facecolor="none", edgecolor=_SPAN_COLOR, hatch="//", linewidth=1.2,
            label=label if i == 0 else None, zorder=3,
        )


def spans_above_threshold(
    values: np.ndarray, threshold: float, frame_hop_s: float
) -> list[tuple[float, float]]:
    """Time spans ``[(start_s, end_s), ...]`` of the runs of frames with ``value > threshold``.

    Args:
        values: ``(T,)`` frame values.
        threshold: strict lower bound.
        frame_hop_s: frame hop in seconds.
    """
    above = np.asarray(values) > threshold  # (T,)
    edges = np.diff(np.r_[0, above.astype(np.int8), 0])
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(float(s * frame_hop_s), float(e * frame_hop_s)) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------- spectrogram


SPECTROGRAM_WINDOW_S = 0.025
SPECTROGRAM_HOP_S = 0.010


def compute_spectrogram(
    wave: np.ndarray | torch.Tensor,
    sample_rate: int = 16000,
    kind: str = "logmel",
    n_mels: int = 80,
) -> tuple[np.ndarray, int]:
    """Log-mel or linear log-power spectrogram in dB (torchaudio; 25 ms window, 10 ms hop), the
    same as librosa's ``stft`` / ``melspectrogram`` / ``power_to_db(ref=np.max, top_db=80)`` with
    their defaults (periodic Hann window, centred frames padded with zeros, Slaney mel filters).
    torchaudio rather than librosa computes it because librosa's first call in a fresh environment
    compiles its numba kernels (about 11 s on a 2-core CPU); librosa draws it.

    Args:
        wave: ``(N,)`` mono waveform.
        sample_rate: sampling rate in Hz.
        kind: ``"logmel"`` or ``"linear"``.
        n_mels: mel bands for ``"logmel"`` (0 Hz to Nyquist).

    Returns:
        ``(spec, hop_length)``: ``spec`` ``(F, frames)`` in dB (80 dB range), ``hop_length``
        in samples.
    """
    import torchaudio

    if kind not in ("logmel", "linear"):
        raise ValueError(f"kind must be 'logmel' or 'linear', got {kind!r}.")
    x = as_1d(wave, "wave").astype(np.float32)  # (N,)
    win = max(16, int(round(SPECTROGRAM_WINDOW_S * sample_rate)))
    hop = max(1, int(round(SPECTROGRAM_HOP_S * sample_rate)))
    n_fft = 1 << (win - 1).bit_length()
    if x.size < n_fft:  # centred frames need at least n_fft samples
        x = np.pad(x, (0, n_fft - x.size))
    with torch.no_grad():
        power = torchaudio.functional.spectrogram(
            torch.from_numpy(x).double(), pad=0, window=torch.hann_window(win, dtype=torch.float64), n_fft=n_fft,
            hop_length=hop, win_length=win, power=2.0, normalized=False, center=True, pad_mode="constant",
        )  # (n_fft/2+1, frames)
        if kind == "logmel":
            fb = torchaudio.functional.melscale_fbanks(
                n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, norm="slaney", mel_scale="slaney",
            ).double()  # (n_fft/2+1, n_mels)
            power = fb.T @ power
        ref = torch.clamp(power.max(), min=1e-10)
        db = torchaudio.functional.amplitude_to_DB(power, 10.0, 1e-10, float(torch.log10(ref)), top_db=80.0)
    return db.float().numpy(), hop


def plot_spectrogram(
    wave: np.ndarray | torch.Tensor,
    sample_rate: int = 16000,
    ax: Axes | None = None,
    kind: str = "logmel",
    n_mels: int = 80,
    cmap: str = "magma",
) -> QuadMesh:
    """Spectrogram drawn by ``librosa.display.specshow``: time (s) and frequency (Hz) axes.

    Args:
        wave: ``(N,)`` mono waveform.
        sample_rate: sampling rate in Hz.
        ax: axes to draw on (new figure if ``None``).
        kind: ``"logmel"`` (a mel-spaced frequency axis labelled in Hz) or ``"linear"`` (Hz).
        n_mels: mel bands for ``"logmel"``.
        cmap: colormap.

    Returns:
        The :class:`~matplotlib.collections.QuadMesh`; its cells span ``[0, N / sample_rate]``
        seconds and ``[0, sample_rate / 2]`` Hz.
    """
    import librosa.display

    ax = _new_axes(ax)
    spec, hop = compute_spectrogram(wave, sample_rate, kind, n_mels)
    duration = as_1d(wave, "wave").size / sample_rate
    nyquist = sample_rate / 2
    x_coords = np.linspace(0.0, duration, spec.shape[1] + 1)  # cell edges over the recording (s)
    y_coords = (librosa.mel_frequencies(spec.shape[0] + 1, fmin=0.0, fmax=nyquist) if kind == "logmel"
                else np.linspace(0.0, nyquist, spec.shape[0] + 1))  # cell edges (Hz)
    mesh = librosa.display.specshow(
        spec, sr=sample_rate, hop_length=hop, x_coords=x_coords, y_coords=y_coords, x_axis="s",
        y_axis="mel" if kind == "logmel" else "linear", fmax=nyquist, cmap=cmap, ax=ax,
    )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    return mesh


# ----------------------------------------------------------------------------- importance


@dataclass
class ImportanceOverlay:
    """What :func:`plot_importance_overlay` drew, for tests and interactive updates.

    Attributes:
        figure: the figure.
        ax: spectrogram axes (time in s, frequency in Hz).
        twin_ax: twin y axis carrying the importance heat strip and line (linear scale).
        spectrogram: the spectrogram mesh.
        overlay_image: the semi-transparent importance image, data ``importance[None, :]``.
        line: the importance line (x = frame centres, y = importance).
        importance: ``(T,)`` the exact importance values drawn (a copy of the input).
        extent: ``(x0, x1, y0, y1)`` of the overlay; ``x1 == T * frame_hop_s``.
        threshold: the threshold used, or ``None``.
        highlighted_spans_s: spans of frames above ``threshold`` that were highlighted.
        spoof_spans_s: ground-truth spans shaded.
    """

    figure: Figure
    ax: Axes
    twin_ax: Axes
    spectrogram: QuadMesh
    overlay_image: AxesImage
    line: Line2D
    importance: np.ndarray
    extent: tuple[float, float, float, float]
    threshold: float | None = None
    highlighted_spans_s: list[tuple[float, float]] = field(default_factory=list)
    spoof_spans_s: list[tuple[float, float]] = field(default_factory=list)


def plot_importance_overlay(
    wave: np.ndarray | torch.Tensor,
    importance: np.ndarray | torch.Tensor,
    frame_hop_s: float = 0.02,
    sample_rate: int = 16000,
    ax: Axes | None = None,
    spoof_spans_s: Sequence[tuple[float, float]] | None = None,
    threshold: float | None = None,
    label: str = "importance",
    cmap: str = "viridis",
    kind: str = "logmel",
    overlay_alpha: float = 0.35,
) -> ImportanceOverlay:
    """Spectrogram with frame importance drawn over it on the same time axis.

    The importance appears twice: as a semi-transparent heat image over the whole
    spectrogram (frame ``t`` covers ``[t * hop, (t + 1) * hop]``) and as a line on a twin
    y axis. Ground-truth spoofed spans are hatched; frames above ``threshold`` are
    highlighted and the threshold is drawn as a dashed line.

    Args:
        wave: ``(N,)`` mono waveform.
        importance: ``(T,)`` frame importance (any real scale; the line axis adapts).
        frame_hop_s: frame hop in seconds (20 ms for the detector's frames).
        sample_rate: sampling rate of ``wave``.
        ax: axes to draw on (new figure if ``None``).
        spoof_spans_s: ground-truth spoofed spans ``[(start_s, end_s), ...]``.
        threshold: highlight frames with importance ``> threshold``.
        label: name of the importance (legend / y label).
        cmap: colormap of the heat overlay.
        kind: spectrogram kind, ``"logmel"`` or ``"linear"``.
        overlay_alpha: opacity of the heat overlay.

    Returns:
        An :class:`ImportanceOverlay` exposing the drawn data.
    """
    if frame_hop_s <= 0:
        raise ValueError(f"frame_hop_s must be positive, got {frame_hop_s}.")
    values = as_1d(importance, "importance").copy()  # (T,)
    ax = _new_axes(ax, figsize=(10.0, 3.5))
    spectrogram = plot_spectrogram(wave, sample_rate, ax=ax, kind=kind)
    n_frames = values.size
    vmin, vmax = float(values.min()), float(values.max())
    if threshold is not None:  # keep the threshold line in view
        vmin, vmax = min(vmin, float(threshold)), max(vmax, float(threshold))
    if vmax <= vmin:
        vmax = vmin + 1.0
    pad = 0.05 * (vmax - vmin)
    # the importance lives on a twin axis with a linear scale (the spectrogram's is mel)
    twin = ax.twinx()
    extent = (0.0, n_frames * frame_hop_s, vmin - pad, vmax + pad)
    overlay_image = twin.imshow(
        values[None, :], origin="lower", aspect="auto", cmap=cmap, alpha=overlay_alpha,
        extent=extent, vmin=vmin, vmax=vmax, interpolation="nearest", zorder=2,
    )
    centres = (np.arange(n_frames) + 0.5) * frame_hop_s  # (T,)
    (line,) = twin.plot(centres, values, color="white", linewidth=1.5, label=label, zorder=4)
    twin.set_ylabel(label)
    twin.set_ylim(vmin - pad, vmax + pad)

    highlighted: list[tuple[float, float]] = []
    if threshold is not None:
        highlighted = spans_above_threshold(values, float(threshold), frame_hop_s)
        for i, (start, end) in enumerate(highlighted):
            twin.axvspan(
                start, end, color="cyan", alpha=0.25, zorder=1,
                label=f"{label} > {threshold:g}" if i == 0 else None,
            )
        twin.axhline(float(threshold), color="cyan", linestyle="--", linewidth=1.0)

    spans = [(float(s), float(e)) for s, e in (spoof_spans_s or [])]
    _shade_spans(twin, spans, label="spoofed (ground truth)")

    duration = as_1d(wave, "wave").size / sample_rate
    ax.set_xlim(0.0, max(duration, extent[1]))
    handles, labels = twin.get_legend_handles_labels()
    if len(handles) > 1:
        twin.legend(handles, labels, loc="upper right", fontsize="small", framealpha=0.7)
    return ImportanceOverlay(
        figure=ax.figure, ax=ax, twin_ax=twin, spectrogram=spectrogram,
        overlay_image=overlay_image, line=line, importance=values, extent=extent,
        threshold=None if threshold is None else float(threshold),
        highlighted_spans_s=highlighted, spoof_spans_s=spans,
    )


def plot_waveform(
    wave: np.ndarray | torch.Tensor,
    sample_rate: int = 16000,
    ax: Axes | None = None,
    spoof_spans_s: Sequence[tuple[float, float]] | None = None,
) -> Axes:
    """Waveform against time in seconds, ground-truth spoofed spans hatched.

    Args:
        wave: ``(N,)`` mono waveform.
        sample_rate: sampling rate in Hz.
        ax: axes to draw on (new figure if ``None``).
        spoof_spans_s: spoofed spans ``[(start_s, end_s), ...]``.

    Returns:
        The axes.
    """
    x = as_1d(wave, "wave")
    ax = _new_axes(ax, figsize=(10.0, 2.0))
    t = np.arange(x.size) / sample_rate
    ax.plot(t, x, color="0.25", linewidth=0.5)
    _shade_spans(ax, spoof_spans_s, label="spoofed (ground truth)")
    ax.set_xlim(0.0, x.size / sample_rate)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("amplitude")
    if spoof_spans_s:
        ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_prototype_similarity(
    sim_bona: np.ndarray | torch.Tensor,
    sim_spoof: np.ndarray | torch.Tensor,
    frame_hop_s: float = 0.02,
    ax: Axes | None = None,
    spoof_spans_s: Sequence[tuple[float, float]] | None = None,
) -> Axes:
    """Per-frame cosine similarity to the bona fide and spoof prototypes.

    Args:
        sim_bona: ``(T,)`` similarity to the bona fide prototype.
        sim_spoof: ``(T,)`` similarity to the spoof prototype.
        frame_hop_s: frame hop in seconds.
        ax: axes to draw on (new figure if ``None``).
        spoof_spans_s: ground-truth spoofed spans to hatch.

    Returns:
        The axes.
    """
    bona = as_1d(sim_bona, "sim_bona")
    spoof = as_1d(sim_spoof, "sim_spoof")
    if bona.size != spoof.size:
        raise ValueError(f"sim_bona has {bona.size} frames but sim_spoof has {spoof.size}.")
    ax = _new_axes(ax, figsize=(10.0, 2.5))
    t = (np.arange(bona.size) + 0.5) * frame_hop_s
    ax.plot(t, bona, color=_BONA_COLOR, label="sim. to bona fide prototype")
    ax.plot(t, spoof, color=_SPOOF_COLOR, label="sim. to spoof prototype")
    ax.fill_between(t, bona, spoof, where=spoof > bona, color=_SPOOF_COLOR, alpha=0.15,
                    interpolate=True)
    _shade_spans(ax, spoof_spans_s, label="spoofed (ground truth)")
    ax.set_xlim(0.0, bona.size * frame_hop_s)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("cosine similarity")
    ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_method_comparison(
    wave: np.ndarray | torch.Tensor,
    attributions: Mapping[str, np.ndarray | torch.Tensor],
    frame_hop_s: float = 0.02,
    sample_rate: int = 16000,
    spoof_spans_s: Sequence[tuple[float, float]] | None = None,
    normalize: bool = True,
    cmap: str = "viridis",
) -> Figure:
    """Spectrogram on top, then one row per attribution method, sharing the time axis.

    Args:
        wave: ``(N,)`` mono waveform.
        attributions: method name -> ``(T,)`` frame attribution.
        frame_hop_s: frame hop in seconds.
        sample_rate: sampling rate of ``wave``.
        spoof_spans_s: ground-truth spoofed spans hatched in every row.
        normalize: min-max scale each method to [0, 1] so rows are comparable
            (methods have different units, e.g. IG can be negative).
        cmap: colormap of the heat strips.

    Returns:
        The figure (``1 + len(attributions)`` rows).
    """
    if not attributions:
        raise ValueError("attributions is empty: pass at least one method.")
    n_rows = 1 + len(attributions)
    fig, axes = plt.subplots(
        n_rows, 1, sharex=True, figsize=(10.0, 2.0 + 1.2 * len(attributions)),
        layout="constrained", gridspec_kw={"height_ratios": [2.0] + [1.0] * len(attributions)},
    )
    plot_spectrogram(wave, sample_rate, ax=axes[0])
    axes[0].set_xlabel("")
    axes[0].set_title("spectrogram")
    _shade_spans(axes[0], spoof_spans_s, label="spoofed")
    for ax, (name, attribution) in zip(axes[1:], attributions.items()):
        values = as_1d(attribution, f"attributions[{name!r}]")
        if normalize:
            lo, hi = values.min(), values.max()
            values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
        ax.imshow(values[None, :], origin="lower", aspect="auto", cmap=cmap, alpha=0.6,
                  extent=(0.0, values.size * frame_hop_s, lo, hi), vmin=lo, vmax=hi,
                  interpolation="nearest")
        ax.plot((np.arange(values.size) + 0.5) * frame_hop_s, values, color="black",
                linewidth=1.0)
        _shade_spans(ax, spoof_spans_s, label="spoofed")
        ax.set_ylim(lo, hi)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("time (s)")
    duration = as_1d(wave, "wave").size / sample_rate
    axes[-1].set_xlim(0.0, duration)
    return fig


# ----------------------------------------------------------------------------- faithfulness


def plot_deletion_insertion(
    results: Mapping[str, Mapping[str, object]],
    ax: Sequence[Axes] | None = None,
) -> Figure:
    """Deletion and insertion curves of several methods, AUCs in the legend.

    Args:
        results: method name -> the dict returned by
            :func:`xai_lib.explanation.metrics.deletion_insertion`.
        ax: a pair of axes ``(deletion_ax, insertion_ax)``; new figure if ``None``.

    Returns:
        The figure.
    """
    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.5), sharey=True, layout="constrained")
    else:
        axes = list(ax)
        if len(axes) != 2:
            raise ValueError("ax must be a pair (deletion_ax, insertion_ax).")
        fig = axes[0].figure
    for name, res in results.items():
        try:
            fractions = np.asarray(res["fractions"])
            for a, kind in zip(axes, ("deletion", "insertion")):
                a.plot(fractions, np.asarray(res[f"{kind}_curve"]),
                       label=f"{name} (AUC {float(res[f'{kind}_auc']):.3f})")
        except KeyError as err:
            raise KeyError(
                f"results[{name!r}] lacks {err}; pass the dicts returned by deletion_insertion."
            ) from None
    for a, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        a.set_title(f"{kind} ({better} AUC is better)")
        a.set_xlabel(f"fraction of frames {'removed' if kind == 'deletion' else 'inserted'}")
        a.set_xlim(0.0, 1.0)
        a.legend(fontsize="small")
    axes[0].set_ylabel("spoof probability")
    return fig


# ----------------------------------------------------------------------------- stage 1


def plot_det_curve(
    bona_scores: np.ndarray | torch.Tensor,
    spoof_scores: np.ndarray | torch.Tensor,
    ax: Axes | None = None,
    label: str | None = None,
) -> Axes:
    """DET curve on normal-deviate axes with the EER point marked.

    Args:
        bona_scores: ``(N_bona,)`` scores (higher = bona fide).
        spoof_scores: ``(N_spoof,)`` scores.
        ax: axes to draw on (new figure if ``None``).
        label: legend label of the curve (the EER is appended).

    Returns:
        The axes (axis ticks in %).
    """
    from scipy.stats import norm

    frr, far, _ = compute_det_curve(bona_scores, spoof_scores)
    eer, _ = utterance_eer(bona_scores, spoof_scores)
    ax = _new_axes(ax, figsize=(4.5, 4.5))
    eps = 1e-4
    to_dev = lambda p: norm.ppf(np.clip(p, eps, 1 - eps))  # noqa: E731
    name = f"{label}, " if label else ""
    ax.plot(to_dev(far), to_dev(frr), label=f"{name}EER {100 * eer:.2f}%")
    ax.plot([to_dev(eer)], [to_dev(eer)], "o", color="black", markersize=5)
    ticks = np.array([0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8])
    tick_pos = to_dev(ticks)
    tick_labels = [f"{100 * t:g}" for t in ticks]
    ax.set_xticks(tick_pos, tick_labels)
    ax.set_yticks(tick_pos, tick_labels)
    lim = (to_dev(0.0005), to_dev(0.9))
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.plot(lim, lim, color="0.7", linestyle=":", linewidth=0.8)
    ax.set_xlabel("false acceptance rate (%)")
    ax.set_ylabel("false rejection rate (%)")
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_score_histogram(
    bona_scores: np.ndarray | torch.Tensor,
    spoof_scores: np.ndarray | torch.Tensor,
    ax: Axes | None = None,
    threshold: float | None = None,
    bins: int = 50,
) -> Axes:
    """Histograms of bona fide and spoof scores on common bins.

    Args:
        bona_scores: ``(N_bona,)`` scores.
        spoof_scores: ``(N_spoof,)`` scores.
        ax: axes to draw on (new figure if ``None``).
        threshold: draw a vertical line at this score (e.g. the EER threshold).
        bins: number of bins.

    Returns:
        The axes.
    """
    bona = as_1d(bona_scores, "bona_scores")
    spoof = as_1d(spoof_scores, "spoof_scores")
    ax = _new_axes(ax, figsize=(6.0, 3.5))
    edges = np.histogram_bin_edges(np.r_[bona, spoof], bins=bins)
    ax.hist(bona, bins=edges, alpha=0.6, color=_BONA_COLOR, label=f"bona fide (n={bona.size})")
    ax.hist(spoof, bins=edges, alpha=0.6, color=_SPOOF_COLOR, label=f"spoof (n={spoof.size})")
    if threshold is not None:
        ax.axvline(float(threshold), color="black", linestyle="--",
                   label=f"threshold {float(threshold):.3g}")
    ax.set_xlabel("score (higher = more bona fide)")
    ax.set_ylabel("utterances")
    ax.legend(fontsize="small")
    return ax


def plot_loss_curves(
    history: Mapping[str, Sequence[float]],
    ax: Axes | None = None,
    logy: bool = False,
) -> Axes:
    """Training curves, one line per named series, against epoch (1-based).

    Args:
        history: series name -> values per epoch (lengths may differ).
        ax: axes to draw on (new figure if ``None``).
        logy: log-scale y axis.

    Returns:
        The axes.
    """
    ax = _new_axes(ax, figsize=(6.0, 3.5))
    for name, values in history.items():
        y = np.asarray(list(values), dtype=np.float64)
        if y.size == 0:
            continue
        ax.plot(np.arange(1, y.size + 1), y, marker="o" if y.size < 30 else None,
                markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    if logy:
        ax.set_yscale("log")
    if history:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def plot_similarity_distributions(
    sims: Mapping[str, np.ndarray | torch.Tensor],
    ax: Axes | None = None,
    bins: int = 50,
) -> Axes:
    """Overlaid density histograms of similarity values (e.g. per class / prototype).

    Args:
        sims: name -> values of any shape (flattened).
        ax: axes to draw on (new figure if ``None``).
        bins: number of common bins.

    Returns:
        The axes.
    """
    ax = _new_axes(ax, figsize=(6.0, 3.5))
    arrays = {
        name: as_1d(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v).reshape(-1),
                     f"sims[{name!r}]")
        for name, v in sims.items()
    }
    if not arrays:
        raise ValueError("sims is empty: pass at least one named array.")
    edges = np.histogram_bin_edges(np.concatenate(list(arrays.values())), bins=bins)
    for name, values in arrays.items():
        ax.hist(values, bins=edges, density=True, alpha=0.5, label=f"{name} (n={values.size})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return ax


# ----------------------------------------------------------------------------- saving


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG (dpi 120), creating parent directories, then close it.

    Args:
        fig: the figure (e.g. ``ax.figure`` or ``overlay.figure``).
        path: output path ending in ``.png`` (added when there is no suffix).

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    elif path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG; got the path {path} (use a .png suffix).")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    logger.info("Saved figure %s", path)
    return path

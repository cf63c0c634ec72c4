"""Label-free calibration of frame scores, and the metrics of a calibrated answer.

Any frame-scoring method (the learned importance, a gradient map, occlusion) answers "which
frames are spoofed?" only once it has a threshold that means the same thing on every
recording. The threshold here needs no frame labels:

    tau = the (1 - alpha) quantile of the method's raw frame scores over every frame of the
          bona fide dev utterances,

so about ``alpha`` (the false-flag rate, default 1 %) of genuine speech is flagged, on
ASVspoof, In-the-Wild or PartialSpoof alike. Scores are never re-normalised per utterance:
min-max scaling makes every recording, genuine ones included, show "important" frames.
The one exception is kept for comparison and labelled: ``grad_cam_minmax05`` (the WeDefense
practice, per-utterance min-max Grad-CAM) declares a fixed threshold of 0.5
(``AttributionMethod.fixed_threshold``), used as it is and measured with the same metrics
(:func:`xai_lib.explanation.report.calibrate_methods`, ``threshold_source`` "fixed").

Metrics of the answer at tau (:func:`calibrated_metrics`): the false-flag rate on bona fide
utterances, and frame precision, recall, F1 and IoU of "score > tau" against the spoofed
frames, pooled over the partially spoofed utterances; and the PartialSpoof-style pooled
segment EER at six resolutions (:func:`frame_eer_by_resolution`), which needs no threshold.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from xai_lib.explanation.metrics import frame_eer

__all__ = [
    "RESOLUTIONS_S",
    "STORED_ALPHAS",
    "CALIBRATED_KEYS",
    "frame_threshold",
    "calibration_record",
    "threshold_for",
    "calibrated_metrics",
    "frame_eer_by_resolution",
]

log = logging.getLogger(__name__)

RESOLUTIONS_S = (0.02, 0.04, 0.08, 0.16, 0.32, 0.64)  # PartialSpoof segment resolutions
STORED_ALPHAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # thresholds kept for other false-flag rates
CALIBRATED_KEYS = ("threshold", "threshold_source", "false_flag_rate", "precision", "recall", "f1", "iou", "frame_eer_by_resolution")


def _flat(scores: Sequence[np.ndarray]) -> np.ndarray:
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    return np.concatenate(arrays) if arrays else np.zeros(0)


def frame_threshold(bonafide_scores: Sequence[np.ndarray], false_flag_rate: float) -> float:
    """``tau``: the ``1 - false_flag_rate`` quantile of every frame score of bona fide utterances.

    Args:
        bonafide_scores: one array ``(T_i,)`` of raw frame scores per bona fide utterance.
        false_flag_rate: ``alpha`` in (0, 1).

    Raises:
        ValueError: no frame, or ``alpha`` outside (0, 1).
    """
    if not 0.0 < false_flag_rate < 1.0:
        raise ValueError(f"false_flag_rate must be in (0, 1), got {false_flag_rate}")
    flat = _flat(bonafide_scores)
    if flat.size == 0:
        raise ValueError("calibration needs the frames of at least one bona fide utterance")
    return float(np.quantile(flat, 1.0 - false_flag_rate))


def calibration_record(bonafide_scores: Sequence[np.ndarray], false_flag_rate: float, split: str = "dev") -> dict[str, Any]:
    """What a checkpoint stores: ``threshold`` at ``false_flag_rate``, the thresholds of
    :data:`STORED_ALPHAS` (``bonafide_quantiles``, keys like ``"0.01"``), and what they came from."""
    return {
        "threshold": frame_threshold(bonafide_scores, false_flag_rate),
        "false_flag_rate": float(false_flag_rate),
        "bonafide_quantiles": {f"{a:g}": frame_threshold(bonafide_scores, a) for a in STORED_ALPHAS},
        "n_utterances": len(bonafide_scores),
        "n_frames": int(_flat(bonafide_scores).size),
        "split": split,
    }


def threshold_for(calibration: dict[str, Any], false_flag_rate: float | None = None) -> float:
    """The stored threshold for ``false_flag_rate`` (``None``: the calibrated one).

    Raises:
        ValueError: that rate was not stored (the message lists the stored ones).
    """
    if false_flag_rate is None or abs(false_flag_rate - calibration["false_flag_rate"]) < 1e-12:
        return float(calibration["threshold"])
    stored = calibration.get("bonafide_quantiles") or {}
    for key, tau in stored.items():
        if abs(float(key) - false_flag_rate) < 1e-12:
            return float(tau)
    raise ValueError(f"no threshold stored for a false-flag rate of {false_flag_rate:g}; stored: "
                     f"{', '.join(sorted(stored, key=float)) or calibration['false_flag_rate']}")


def _pairs(scores: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scores and masks truncated to the shorter of each pair (framings may differ by a frame)."""
    out = []
    for s, m in zip(scores, masks):
        s, m = np.asarray(s, dtype=np.float64).reshape(-1), np.asarray(m, dtype=bool).reshape(-1)
        n = min(s.size, m.size)
        out.append((s[:n], m[:n]))
    return out


def calibrated_metrics(
    threshold: float,
    bonafide_scores: Sequence[np.ndarray],
    partial_scores: Sequence[np.ndarray],
    partial_masks: Sequence[np.ndarray],
) -> dict[str, float | None]:
    """The answer "frames with score > threshold are spoofed", measured.

    Args:
        threshold: ``tau``.
        bonafide_scores: frame scores of bona fide utterances (for the false-flag rate).
        partial_scores, partial_masks: frame scores and spoofed-frame masks of the partially
            spoofed utterances (pooled for precision, recall, F1, IoU).

    Returns:
        ``{"threshold", "false_flag_rate", "precision", "recall", "f1", "iou"}``; a value is
        ``None`` when undefined (no frame flagged for precision, no spoofed frame for recall).
    """
    bona = _flat(bonafide_scores)
    pairs = _pairs(partial_scores, partial_masks)
    flagged = np.concatenate([s > threshold for s, _ in pairs]) if pairs else np.zeros(0, bool)
    truth = np.concatenate([m for _, m in pairs]) if pairs else np.zeros(0, bool)
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {
        "threshold": float(threshold),
        "false_flag_rate": float(np.mean(bona > threshold)) if bona.size else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else None,
    }


def frame_eer_by_resolution(
    scores: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    frame_hop_s: float,
    resolutions_s: Sequence[float] = RESOLUTIONS_S,
) -> dict[str, float | None]:
    """Pooled segment EER at each resolution, the PartialSpoof convention.

    Every utterance of a split (bona fide: all-False mask; fully spoofed: all-True; partially
    spoofed: its spans) is cut into segments of ``resolution`` seconds (the last one may be
    shorter); a segment is spoofed if any of its frames is, and scored by the max of its
    frames' scores; one EER over all segments of all utterances (:func:`frame_eer`).

    Returns:
        ``{"0.02": eer, ...}`` (``None`` where the segments hold one class only).
    """
    pairs = _pairs(scores, masks)
    out: dict[str, float | None] = {}
    for res in resolutions_s:
        k = max(1, int(round(res / frame_hop_s)))
        seg_scores, seg_labels = [], []
        for s, m in pairs:
            if s.size == 0:
                continue
            starts = np.arange(0, s.size, k)
            seg_scores.append(np.maximum.reduceat(s, starts))
            seg_labels.append(np.logical_or.reduceat(m, starts))
        ss = np.concatenate(seg_scores) if seg_scores else np.zeros(0)
        ll = np.concatenate(seg_labels) if seg_labels else np.zeros(0, bool)
        out[f"{res:g}"] = frame_eer(ss, ll) if 0 < ll.sum() < ll.size else None
    return out

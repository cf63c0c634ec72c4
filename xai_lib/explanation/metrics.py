"""Explanation metrics: faithfulness (deletion/insertion) and localization.

* :func:`deletion_insertion` removes (or inserts) frames in descending order of
  importance and records the detector's spoof probability after each step. A faithful
  explanation makes the probability drop fast when its top frames are deleted (low
  deletion AUC) and rise fast when they are inserted (high insertion AUC). A random
  ordering (:func:`random_baseline_importance`) is the floor to beat.
* :func:`localization_metrics` compares frame importance with ground-truth spoofed frames
  of partially spoofed utterances: pooled frame-level ROC-AUC and EER, and the pointing
  game.

Example::

    def score_fn(keep):                       # keep: (B, T) float in {0, 1}
        return spoof_prob(frames * keep[..., None])   # (B,)

    res = deletion_insertion(score_fn, importance, lengths=lengths, steps=20)
    res["deletion_auc"], res["insertion_auc"]
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Sequence, Union

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm.auto import tqdm

__all__ = [
    "deletion_insertion",
    "localization_metrics",
    "localization_per_attack",
    "random_baseline_importance",
    "frame_roc_auc",
    "frame_eer",
]

logger = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor], Union[torch.Tensor, np.ndarray, Sequence[float]]]
ImportanceInput = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray], Sequence[torch.Tensor]]


def _to_numpy(x: object, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------- faithfulness


def _pad_importance(
    importance: ImportanceInput,
    lengths: Sequence[int] | np.ndarray | torch.Tensor | None,
    frame_mask: np.ndarray | torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(importance (B, T) float64, valid (B, T) bool)``."""
    if lengths is not None and frame_mask is not None:
        raise ValueError("Pass either `lengths` or `frame_mask` to deletion_insertion, not both.")

    if isinstance(importance, (np.ndarray, torch.Tensor)) and _to_numpy(importance).ndim == 2:
        imp = _to_numpy(importance)  # (B, T)
        batch, max_t = imp.shape
        if frame_mask is not None:
            valid = _to_numpy(frame_mask, dtype=bool)
            if valid.shape != imp.shape:
                raise ValueError(
                    f"frame_mask has shape {valid.shape} but importance has {imp.shape}; "
                    "they must match (B, T)."
                )
        elif lengths is not None:
            lens = _to_numpy(lengths, dtype=np.int64).reshape(-1)
            if lens.size != batch:
                raise ValueError(f"lengths has {lens.size} entries for a batch of {batch}.")
            if np.any(lens > max_t) or np.any(lens < 0):
                raise ValueError(
                    f"lengths {lens.tolist()} must lie in [0, T={max_t}] (T = importance.shape[1])."
                )
            valid = np.arange(max_t)[None, :] < lens[:, None]
        else:
            valid = np.ones_like(imp, dtype=bool)
    else:
        rows = [_to_numpy(r).reshape(-1) for r in importance]  # list of (T_i,)
        if not rows:
            raise ValueError("importance is empty: pass at least one utterance.")
        if frame_mask is not None:
            raise ValueError(
                "frame_mask is only supported with a padded (B, T) importance; with a list "
                "of per-utterance arrays pass `lengths` or nothing."
            )
        lens = (
            np.array([r.size for r in rows])
            if lengths is None
            else _to_numpy(lengths, dtype=np.int64).reshape(-1)
        )
        if lens.size != len(rows):
            raise ValueError(f"lengths has {lens.size} entries for {len(rows)} utterances.")
        for i, (r, n) in enumerate(zip(rows, lens)):
            if n > r.size or n < 0:
                raise ValueError(
                    f"lengths[{i}]={n} is outside [0, {r.size}] (the importance of utterance {i})."
                )
        max_t = int(max(r.size for r in rows))
        imp = np.zeros((len(rows), max_t))
        valid = np.zeros((len(rows), max_t), dtype=bool)
        for i, (r, n) in enumerate(zip(rows, lens)):
            imp[i, : r.size] = r
            valid[i, :n] = True

    n_valid = valid.sum(axis=1)
    if np.any(n_valid == 0):
        raise ValueError(
            f"Utterance {int(np.flatnonzero(n_valid == 0)[0])} has no valid frame; "
            "remove empty utterances before computing deletion/insertion."
        )
    if not np.all(np.isfinite(imp[valid])):
        raise ValueError("importance contains NaN/inf on valid frames; fix the attribution first.")
    return imp, valid


def _descending_ranks(imp: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rank of every valid frame in descending importance (0 = most important).

    Ties are broken by frame index (earlier first, stable sort). Invalid frames get a
    rank >= the number of valid frames, so they are never selected.
    """
    batch, max_t = imp.shape
    key = np.where(valid, -imp, np.inf)  # invalid frames sort last
    order = np.argsort(key, axis=1, kind="stable")  # (B, T)
    ranks = np.empty_like(order)
    ranks[np.arange(batch)[:, None], order] = np.arange(max_t)[None, :]
    return ranks


def _call_score_fn(score_fn: ScoreFn, keep: torch.Tensor, batch: int) -> np.ndarray:
    with torch.no_grad():
        out = score_fn(keep)
    arr = _to_numpy(out).reshape(-1)
    if arr.size != batch:
        raise ValueError(
            f"score_fn returned {arr.size} values for a batch of {batch}; it must return "
            "one spoof probability per utterance, shape (B,)."
        )
    return arr


def deletion_insertion(
    score_fn: ScoreFn,
    importance: ImportanceInput,
    lengths: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    frame_mask: np.ndarray | torch.Tensor | None = None,
    steps: int = 20,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray | float]:
    """Deletion and insertion curves of an importance ordering on a detector.

    Frames are ranked by descending importance (stable sort: ties keep frame order) among
    the *valid* frames only. For step ``k = 0..steps`` the fraction ``f = k / steps`` of
    each utterance's valid frames, ``n_k = round(f * n_valid)``, is

    * **deleted** (deletion curve): ``keep = 1`` on the valid frames ranked ``>= n_k``;
      at ``f = 0`` every valid frame is kept, at ``f = 1`` none;
    * **inserted** (insertion curve): ``keep = 1`` on the valid frames ranked ``< n_k``;
      at ``f = 0`` none, at ``f = 1`` all.

    Padded (invalid) frames always get ``keep = 0``: ``score_fn`` must itself treat them
    as absent (e.g. through the lengths it already knows). ``score_fn`` is called once per
    step and curve with the whole batch (``2 * (steps + 1)`` calls), under
    ``torch.no_grad()``.

    Args:
        score_fn: ``keep (B, T) float32 in {0, 1} -> (B,)`` spoof probability of each
            utterance when only frames with ``keep = 1`` are present. How a frame is
            removed (zeroed, replaced by a baseline, dropped) is the caller's choice.
        importance: ``(B, T)`` array/tensor, or a list of ``B`` arrays ``(T_i,)``
            (padded to ``T = max T_i``).
        lengths: ``(B,)`` valid frames per utterance (the first ``lengths[b]`` frames).
            Default: all frames of a ``(B, T)`` input / each array's length for a list.
        frame_mask: ``(B, T)`` bool validity mask, an alternative to ``lengths``.
        steps: number of equal fraction steps (``steps + 1`` points on each curve).
        device: device of the ``keep`` tensor passed to ``score_fn`` (default CPU).
        progress: show a tqdm progress bar over the ``score_fn`` calls.

    Returns:
        A dict with

        * ``"deletion_auc"``, ``"insertion_auc"``: floats, means over utterances of the
          trapezoid AUC over the fraction axis ``[0, 1]`` (deletion: lower is better,
          insertion: higher is better);
        * ``"deletion_curve"``, ``"insertion_curve"``: ``(steps + 1,)`` mean curves;
        * ``"fractions"``: ``(steps + 1,)`` the fraction axis;
        * ``"deletion_auc_per_utt"``, ``"insertion_auc_per_utt"``: ``(B,)``;
        * ``"deletion_curves"``, ``"insertion_curves"``: ``(B, steps + 1)``.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    imp, valid = _pad_importance(importance, lengths, frame_mask)  # (B, T), (B, T)
    batch = imp.shape[0]
    ranks = _descending_ranks(imp, valid)  # (B, T)
    n_valid = valid.sum(axis=1)  # (B,)
    fractions = np.arange(steps + 1) / steps  # (K,)
    # n_k = round(k * n / steps), half up, in exact integer arithmetic
    n_selected = (2 * np.arange(steps + 1)[:, None] * n_valid[None, :] + steps) // (2 * steps)

    deletion = np.empty((batch, steps + 1))
    insertion = np.empty((batch, steps + 1))
    bar = tqdm(total=2 * (steps + 1), desc="deletion/insertion", disable=not progress, leave=False)
    for k in range(steps + 1):
        top = ranks < n_selected[k][:, None]  # (B, T) the n_k most important valid frames
        for curve, keep_np in ((deletion, valid & ~top), (insertion, top)):
            keep = torch.as_tensor(keep_np, dtype=torch.float32, device=device)
            curve[:, k] = _call_score_fn(score_fn, keep, batch)
            bar.update(1)
    bar.close()

    del_auc = np.trapezoid(deletion, fractions, axis=-1)  # (B,)
    ins_auc = np.trapezoid(insertion, fractions, axis=-1)
    return {
        "deletion_auc": float(del_auc.mean()),
        "insertion_auc": float(ins_auc.mean()),
        "deletion_curve": deletion.mean(axis=0),
        "insertion_curve": insertion.mean(axis=0),
        "fractions": fractions,
        "deletion_auc_per_utt": del_auc,
        "insertion_auc_per_utt": ins_auc,
        "deletion_curves": deletion,
        "insertion_curves": insertion,
    }


def random_baseline_importance(
    lengths: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0
) -> list[np.ndarray]:
    """Random importance (uniform in [0, 1)), the floor any explanation must beat.

    Args:
        lengths: ``(B,)`` number of frames per utterance.
        seed: seed of the numpy generator (same seed, same orderings).

    Returns:
        ``B`` arrays of shape ``(lengths[b],)``.
    """
    rng = np.random.default_rng(seed)
    return [rng.random(int(n)) for n in _to_numpy(lengths, dtype=np.int64).reshape(-1)]


# ----------------------------------------------------------------------------- localization


def frame_roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Frame-level ROC-AUC (scikit-learn; tied scores count 1/2): spoofed frames positive."""
    return float(roc_auc_score(np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64)))


def frame_eer(scores: np.ndarray, positive: np.ndarray) -> float:
    """Frame-level EER: where the ROC (scikit-learn, one point per distinct score) crosses
    FNR = FPR, linearly interpolated between its two neighbouring points.

    Not the ASVspoof utterance EER (:func:`xai_lib.detector.metrics.utterance_eer`, the
    nearest point of the DET curve): frames pool many tied scores, where interpolation
    gives the value a constant score deserves (0.5).
    """
    fpr, tpr, _ = roc_curve(np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64),
                            drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # decreasing from 1 to -1 along the ROC
    cross = int(np.flatnonzero(diff <= 0)[0])
    if cross == 0 or diff[cross] == 0:
        return float((fnr[cross] + fpr[cross]) / 2)
    d0, d1 = diff[cross - 1], diff[cross]
    t = d0 / (d0 - d1)
    return float(fpr[cross - 1] + t * (fpr[cross] - fpr[cross - 1]))


def localization_metrics(
    importance: Sequence[np.ndarray | torch.Tensor],
    spoof_masks: Sequence[np.ndarray | torch.Tensor],
    max_length_mismatch: int = 2,
) -> dict[str, float]:
    """Frame-level localization of spoofed regions by an importance map.

    Spoofed frames are the positive class and the importance is the score. Each pair is
    truncated to the shorter of the two lengths (framing conventions of attribution and
    labels can differ by a frame or two); a larger mismatch is an error.

    Args:
        importance: ``N`` arrays ``(T_i,)`` of frame importance.
        spoof_masks: ``N`` bool arrays ``(T_i',)``, True on spoofed frames, at the same
            frame rate as the importance (e.g. 20 ms).
        max_length_mismatch: largest allowed ``|T_i - T_i'|`` in frames.

    Returns:
        ``{"loc_auc", "loc_eer", "pointing_game", "n_frames", "n_pointing_utts"}``:

        * ``loc_auc``: ROC-AUC pooled over all frames of all utterances (Mann-Whitney,
          ties count 1/2; 0.5 = chance);
        * ``loc_eer``: EER of that pooled ROC, interpolated where FNR = FPR (ties are
          grouped into one ROC point, so a constant importance gives 0.5);
        * ``pointing_game``: fraction of the utterances that contain spoofed frames whose
          arg-max importance frame (the first one on ties) is spoofed;
        * ``n_frames``: frames pooled; ``n_pointing_utts``: utterances in the pointing game.

        ``loc_auc``/``loc_eer`` are NaN (with a warning) when the pooled frames hold only
        one class; ``pointing_game`` is NaN when no utterance has a spoofed frame.
    """
    if len(importance) != len(spoof_masks):
        raise ValueError(
            f"{len(importance)} importance arrays but {len(spoof_masks)} spoof masks; "
            "pass one mask per utterance."
        )
    if len(importance) == 0:
        raise ValueError("localization_metrics needs at least one utterance.")
    all_scores: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    hits: list[bool] = []
    for i, (imp_i, mask_i) in enumerate(zip(importance, spoof_masks)):
        imp = _to_numpy(imp_i).reshape(-1)
        mask = _to_numpy(mask_i, dtype=bool).reshape(-1)
        if abs(imp.size - mask.size) > max_length_mismatch:
            raise ValueError(
                f"Utterance {i}: importance has {imp.size} frames but its spoof mask has "
                f"{mask.size} (more than {max_length_mismatch} apart); they must share the "
                "frame rate (e.g. 20 ms)."
            )
        n = min(imp.size, mask.size)
        imp, mask = imp[:n], mask[:n]
        if n == 0:
            continue
        if not np.all(np.isfinite(imp)):
            raise ValueError(f"Utterance {i}: importance contains NaN/inf.")
        all_scores.append(imp)
        all_labels.append(mask)
        if mask.any():
            hits.append(bool(mask[int(np.argmax(imp))]))

    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        warnings.warn(
            "localization_metrics: the frames hold only one class (all spoofed or all bona "
            "fide); ROC-AUC and EER are undefined (NaN).",
            RuntimeWarning,
            stacklevel=2,
        )
        loc_auc = loc_eer = float("nan")
    else:
        loc_auc = frame_roc_auc(scores, labels)
        loc_eer = frame_eer(scores, labels)
    return {
        "loc_auc": loc_auc,
        "loc_eer": loc_eer,
        "pointing_game": float(np.mean(hits)) if hits else float("nan"),
        "n_frames": int(labels.size),
        "n_pointing_utts": len(hits),
    }


def localization_per_attack(
    importance: Sequence[np.ndarray | torch.Tensor],
    spoof_masks: Sequence[np.ndarray | torch.Tensor],
    attacks: Sequence[object],
) -> dict[str, float] | None:
    """:func:`localization_metrics`' ``loc_auc`` over the utterances of each attack.

    Args:
        importance, spoof_masks: as for :func:`localization_metrics`.
        attacks: the attack id of each utterance; ``None`` and ``"-"`` (none/bona fide) are left out.

    Returns:
        ``{attack: loc_auc}`` in sorted order (NaN where undefined), or ``None`` when no
        utterance names an attack.
    """
    names = [str(a) for a in attacks]
    wanted = sorted(set(names) - {"None", "-"})
    if not wanted:
        return None
    return {
        atk: localization_metrics([w for w, n in zip(importance, names) if n == atk],
                                  [m for m, n in zip(spoof_masks, names) if n == atk])["loc_auc"]
        for atk in wanted
    }

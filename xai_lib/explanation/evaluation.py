"""Evaluate every attribution method on the same utterances.

For each method of :data:`xai_lib.explanation.methods.METHODS` (the learned importance, the captum
baselines, attention rollout, Grad-CAM and its min-max variant, and the random floor)
:func:`evaluate_methods` measures

* **faithfulness**: deletion and insertion curves of the frozen detector's spoof
  probability (:func:`xai_lib.explanation.metrics.deletion_insertion`) on the utterances
  the detector is asked to explain as spoof (``target = 0``; every item whose label is
  not bona fide);
* **localization** on items with a ground-truth spoof mask: pooled frame ROC-AUC, EER and
  the pointing game (:func:`xai_lib.explanation.metrics.localization_metrics`);
* **cost**: attribution milliseconds per utterance and the ratio to one detector forward
  pass per utterance, timed in the same run on the same batches.

How frames are removed
----------------------
Deletion/insertion act in the **representation**, not on the audio: the SSL features of
a batch are computed once and the frozen back end is re-run with
``frame_weights = keep`` (:func:`representation_score_fn`), which multiplies the neck
output of a removed frame by 0. This is the same removal Stage 2's fidelity term uses,
it does not create the out-of-distribution silence edges that zeroing audio would, and it
costs only back-end passes. Every method is measured with the same removal, so the
comparison between methods is fair.

Items
-----
An item is a dict ``{"utt_id": str, "wave": (L,) array/tensor at 16 kHz,
"spoof_mask": (T,) bool frame mask or None, "label": 0 spoof / 1 bona fide / None}``.
Full spoof utterances (no mask) count for faithfulness only; partially spoofed ones
(with a mask) for both; bona fide items with a mask count for localization only.
:func:`load_explanation_set` builds such items from the partially spoofed subset of a split.

Example::

    items = load_explanation_set(cfg.data, "eval", num_utterances=32, detector=detector)
    results = evaluate_methods(detector, xai, items, steps=20, batch_size=8)
    results["importance"]["deletion_auc"], results["random"]["deletion_auc"]
"""
from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from xai_lib.explanation.methods import METHOD_REGISTRY, METHODS, Attributor, ImportanceModel, synchronize
from xai_lib.data.audio import load_audio, pad_batch
from xai_lib.detector.removal import BonafideReference
from xai_lib.explanation.metrics import deletion_insertion, localization_metrics, localization_per_attack

__all__ = [
    "ExplanationItem",
    "RESULT_KEYS",
    "representation_score_fn",
    "evaluate_methods",
    "method_not_applicable",
    "applicable_methods",
    "time_forward",
    "load_explanation_set",
    "load_utterance_items",
    "attribute_items",
]

logger = logging.getLogger(__name__)

RESULT_KEYS: tuple[str, ...] = (
    "deletion_auc",
    "insertion_auc",
    "loc_auc",
    "loc_eer",
    "pointing_game",
    "ms_per_utt",
    "cost_vs_forward",
    "deletion_curve",
    "insertion_curve",
    "fractions",
    "loc_auc_per_attack",
    "attributions",
)


class ExplanationItem(TypedDict, total=False):
    """One utterance to explain (only ``wave`` is required)."""

    utt_id: str
    wave: np.ndarray | Tensor  # (L,) float at 16 kHz
    spoof_mask: np.ndarray | None  # (T,) bool, True = spoofed frame (20 ms)
    label: int | None  # 0 = spoof, 1 = bona fide, None = unknown
    attack: str


# ----------------------------------------------------------------------------- score function


class _RepresentationScorer:
    """Spoof probability of the frozen back end on cached SSL features with frames removed.

    Args:
        detector: the frozen detector.
        ssl_features: (B, T, D) cached front-end output.
        frame_mask: (B, T) bool valid frames.
    """

    def __init__(self, detector: nn.Module, ssl_features: Tensor, frame_mask: Tensor,
                 reference: BonafideReference | None = None) -> None:
        self.detector = detector
        self.ssl_features = ssl_features
        self.frame_mask = frame_mask
        self.reference = reference

    def __call__(self, keep: Tensor) -> Tensor:
        """keep (B, T) float in {0, 1} (or [0, 1]) -> (B,) spoof probability."""
        keep = torch.as_tensor(keep).to(self.ssl_features.device, self.ssl_features.dtype)
        if keep.shape != self.frame_mask.shape:
            raise ValueError(f"keep must be (B, T) = {tuple(self.frame_mask.shape)}, got {tuple(keep.shape)}")
        with torch.no_grad():
            if self.reference is None:
                logits = self.detector.backend(self.ssl_features, self.frame_mask, frame_weights=keep).logits
            else:
                logits = self.detector.backend(self.reference.remove(self.ssl_features, keep), self.frame_mask).logits
        return logits.float().softmax(dim=-1)[:, 0]

    def select(self, rows: Sequence[int]) -> _RepresentationScorer:
        """The scorer restricted to the utterances ``rows`` of the batch."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.ssl_features.device)
        return _RepresentationScorer(self.detector, self.ssl_features[idx], self.frame_mask[idx], self.reference)


def representation_score_fn(
    detector: nn.Module, wave: Tensor, lengths: Tensor | None = None, reference: BonafideReference | None = None
) -> _RepresentationScorer:
    """A deletion/insertion ``score_fn`` that removes frames in the detector's representation.

    The SSL features of ``wave`` are computed once (frozen front end, no grad); each call
    runs the frozen back end with the frames of ``keep = 0`` removed, as Stage 2's fidelity
    term removes them: replaced by the same frames of a bona fide reference utterance
    (``reference``, :mod:`xai_lib.detector.removal`), or, without one, their neck output zeroed.

    Args:
        detector: the frozen detector (``frontend``/``backend``); kept in eval, not modified.
        wave: (B, L) waveform batch, right-padded.
        lengths: (B,) valid samples; ``None`` = all L.

    Returns:
        ``score_fn(keep (B, T)) -> (B,)`` spoof probability (softmax column 0), T = the
        detector's frame count for L. Padded frames are masked whatever ``keep`` says.
    """
    if detector.training:
        raise ValueError("representation_score_fn: put the detector in eval() mode first (detector.eval())")
    device = next(detector.parameters()).device
    wave = torch.as_tensor(wave).to(device, torch.float32)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.long).to(device)
    with torch.no_grad():
        ssl_features, frame_mask = detector.frontend(wave, lengths)  # (B, T, D), (B, T)
    return _RepresentationScorer(detector, ssl_features, frame_mask, reference)


# ----------------------------------------------------------------------------- applicability


def method_not_applicable(detector: nn.Module, method: str) -> str | None:
    """Why ``method`` cannot explain ``detector``, or ``None`` when it can: the method's own
    ``requires`` in :data:`~xai_lib.explanation.methods.METHOD_REGISTRY` (``attention_rollout``
    needs attention maps over the frames, which only the TCM back end returns; ``grad_cam`` and
    ``grad_cam_minmax05`` need a ``gradcam_tap``, which both back ends have)."""
    spec = METHOD_REGISTRY.get(method)
    return None if spec is None or spec.requires is None else spec.requires(detector)


def applicable_methods(detector: nn.Module, methods: Sequence[str]) -> list[str]:
    """``methods`` without those :func:`method_not_applicable` rules out for ``detector`` (each
    one left out is logged with its reason)."""
    keep = []
    for m in methods:
        why = method_not_applicable(detector, m)
        if why is None:
            keep.append(m)
        else:
            logger.warning("attribution method %s skipped: %s", m, why)
    return keep


# ----------------------------------------------------------------------------- evaluation


def _check_items(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if len(items) == 0:
        raise ValueError("evaluate_methods: no items to explain; pass at least one {'wave': ...} item")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "wave" not in item:
            raise ValueError(f"item {i} must be a dict with at least a 'wave' (L,) array, got {type(item).__name__}")
        wave = torch.as_tensor(np.asarray(item["wave"]) if not isinstance(item["wave"], Tensor) else item["wave"])
        if wave.dim() != 1 or wave.numel() == 0:
            raise ValueError(
                f"item {i} ({item.get('utt_id', '?')}): 'wave' must be a non-empty 1-D array of samples, "
                f"got shape {tuple(wave.shape)}"
            )
        label = item.get("label")
        if label not in (0, 1, None):
            raise ValueError(f"item {i} ({item.get('utt_id', '?')}): label must be 0 (spoof), 1 (bona fide) or None")
        mask = item.get("spoof_mask")
        out.append({
            "utt_id": str(item.get("utt_id", f"utt{i}")),
            "wave": wave.float(),
            "spoof_mask": None if mask is None else np.asarray(mask, dtype=bool).reshape(-1),
            "label": label,
            "attack": item.get("attack"),
        })
    return out


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def evaluate_methods(
    detector: nn.Module,
    importance_model: ImportanceModel | None,
    items: Sequence[Mapping[str, Any]],
    methods: Sequence[str] | None = None,
    steps: int = 20,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    warmup: bool = True,
    forward_repeats: int = 3,
    reference: BonafideReference | None = None,
) -> dict[str, dict[str, Any]]:
    """Faithfulness, localization and cost of every method on the same utterances.

    Batches are formed from the items sorted by length (less padding); each batch is
    scored by a timed detector forward pass (the cost reference), then attributed by every method
    (target = 0, spoof) and each attribution is scored by deletion/insertion through
    :func:`representation_score_fn` (SSL features computed once per batch).

    Args:
        detector: the frozen detector (eval mode; never modified).
        importance_model: the Stage-2 model for ``"importance"`` (``None``: that method
            is skipped when ``methods`` is ``None``, an error when it is requested).
        items: :class:`ExplanationItem` dicts (``wave`` required; ``spoof_mask``,
            ``label``, ``utt_id`` optional).
        methods: methods to evaluate; ``None`` = all of :data:`METHODS` available (and
            applicable to ``detector``: :func:`applicable_methods`). A method requested that
            is not applicable is an error naming the reason.
        steps: deletion/insertion steps (``steps + 1`` points per curve).
        batch_size: utterances per batch.
        seed: seed of the ``random`` method (batch ``k`` uses ``seed + k``).
        progress: tqdm bars over batches and methods.
        method_kwargs: per-method options for :meth:`Attributor.attribute`, e.g.
            ``{"integrated_gradients": {"n_steps": 16}}``.
        warmup: run the forward pass and each method once on a short crop first (untimed),
            so that one-time start-up costs do not land in ``ms_per_utt``.
        forward_repeats: the reference forward pass of each batch is timed this many times
            and the median is used (one pass is cheap and noisy; attributions are timed once).
        reference: the bona fide frames that replace removed ones in deletion/insertion
            (``None``: removed frames are zeroed).

    Returns:
        ``{method: {...}}`` with exactly the keys of :data:`RESULT_KEYS`:
        ``deletion_auc``/``insertion_auc`` (means over the items whose label is not 1;
        ``None`` when there is none), ``loc_auc``/``loc_eer``/``pointing_game`` (over the
        items with a spoof mask; ``None`` when undefined), ``ms_per_utt`` (attribution
        wall time per utterance), ``cost_vs_forward`` (``ms_per_utt`` / ms of one
        detector forward per utterance), ``deletion_curve``/``insertion_curve`` (mean
        curves, lists of ``steps + 1`` floats, ``None`` without faithfulness items) and
        ``fractions`` (their x axis), ``loc_auc_per_attack`` (``{attack: loc_auc}`` over the
        items with a spoof mask, by their ``attack``; ``None`` when they name none), and
        ``attributions``: the method's frame scores of every item, in the order of ``items``
        (arrays ``(T_i,)``, for figures; every other value is JSON-serialisable).
    """
    if detector.training:
        raise ValueError("evaluate_methods: put the detector in eval() mode first (detector.eval())")
    if methods is None:
        methods = applicable_methods(detector, [m for m in METHODS if m != "importance" or importance_model is not None])
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown attribution method {m!r}; valid methods: {', '.join(METHODS)}")
        why = method_not_applicable(detector, m)
        if why is not None:
            raise ValueError(f"attribution method {m}: {why}; leave it out of methods")
    if "importance" in methods and importance_model is None:
        raise ValueError("methods include 'importance' but importance_model is None; pass the Stage-2 XAI model")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    method_kwargs = {k: dict(v) for k, v in (method_kwargs or {}).items()}
    unknown = sorted(set(method_kwargs) - set(METHODS))
    if unknown:
        raise ValueError(f"method_kwargs names unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")

    data = _check_items(items)
    attributor = Attributor(detector, importance_model)
    device = attributor.device
    order = sorted(range(len(data)), key=lambda i: -data[i]["wave"].numel())
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]

    if warmup:
        _warm_up(attributor, data[order[-1]]["wave"], methods, method_kwargs)

    fractions = (np.arange(steps + 1) / steps).tolist()
    acc = {
        m: {"seconds": 0.0, "del_auc": [], "ins_auc": [], "del_curves": [], "ins_curves": [], "imp": {}}
        for m in methods
    }
    forward_seconds = 0.0
    for k, rows in enumerate(tqdm(batches, desc="explain batches", disable=not progress)):
        wave, lengths = pad_batch([data[i]["wave"] for i in rows])  # (B, L), (B,)
        wave, lengths = wave.to(device), lengths.to(device)
        forward_seconds += time_forward(detector, wave, lengths, forward_repeats)

        scorer = representation_score_fn(detector, wave, lengths, reference)
        faith_rows = [j for j, i in enumerate(rows) if data[i]["label"] != 1]
        faith_scorer = scorer.select(faith_rows) if faith_rows else None

        for m in tqdm(methods, desc="methods", leave=False, disable=not progress):
            kw = dict(method_kwargs.get(m, {}))
            if m == "random":
                kw["seed"] = seed + k
            att = attributor.attribute(wave, lengths, method=m, target=0, **kw)
            acc[m]["seconds"] += att.seconds
            per_utt = att.per_utterance()
            for j, i in enumerate(rows):
                acc[m]["imp"][i] = per_utt[j]
            if faith_scorer is not None:
                res = deletion_insertion(
                    faith_scorer, att.scores[faith_rows], lengths=att.lengths[faith_rows], steps=steps, device=device
                )
                acc[m]["del_auc"].extend(res["deletion_auc_per_utt"].tolist())
                acc[m]["ins_auc"].extend(res["insertion_auc_per_utt"].tolist())
                acc[m]["del_curves"].append(res["deletion_curves"])
                acc[m]["ins_curves"].append(res["insertion_curves"])

    n = len(data)
    forward_ms = 1000.0 * forward_seconds / n
    loc_rows = [i for i in range(n) if data[i]["spoof_mask"] is not None]
    results: dict[str, dict[str, Any]] = {}
    for m in methods:
        a = acc[m]
        ms = 1000.0 * a["seconds"] / n
        entry: dict[str, Any] = {key: None for key in RESULT_KEYS}
        if a["del_auc"]:
            entry["deletion_auc"] = float(np.mean(a["del_auc"]))
            entry["insertion_auc"] = float(np.mean(a["ins_auc"]))
            entry["deletion_curve"] = np.concatenate(a["del_curves"]).mean(axis=0).tolist()
            entry["insertion_curve"] = np.concatenate(a["ins_curves"]).mean(axis=0).tolist()
        if loc_rows:
            imps, masks = [a["imp"][i] for i in loc_rows], [data[i]["spoof_mask"] for i in loc_rows]
            loc = localization_metrics(imps, masks)
            for key in ("loc_auc", "loc_eer", "pointing_game"):
                entry[key] = _nan_to_none(loc[key])
            per_attack = localization_per_attack(imps, masks, [data[i]["attack"] for i in loc_rows])
            if per_attack is not None:
                entry["loc_auc_per_attack"] = {k: _nan_to_none(v) for k, v in per_attack.items()}
        entry["ms_per_utt"] = ms
        entry["cost_vs_forward"] = ms / forward_ms if forward_ms > 0 else None
        entry["fractions"] = fractions
        entry["attributions"] = [a["imp"][i] for i in range(n)]
        results[m] = entry
        logger.info(
            "%-20s deletion %s insertion %s loc_auc %s pointing %s  %.1f ms/utt (%.1fx forward)",
            m, _fmt(entry["deletion_auc"]), _fmt(entry["insertion_auc"]), _fmt(entry["loc_auc"]),
            _fmt(entry["pointing_game"]), ms, entry["cost_vs_forward"] or float("nan"),
        )
    logger.info("detector forward: %.1f ms/utt over %d utterances", forward_ms, n)
    return results


def attribute_items(
    detector: nn.Module,
    importance_model: ImportanceModel | None,
    items: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, list[np.ndarray]]:
    """Raw frame scores of every item by every method (batched by length, target spoof).

    Returns:
        ``{method: [(T_i,) array per item, in the order of items]}``.
    """
    data = _check_items(items)
    attributor = Attributor(detector, importance_model)
    order = sorted(range(len(data)), key=lambda i: -data[i]["wave"].numel())
    out: dict[str, list[np.ndarray | None]] = {m: [None] * len(data) for m in methods}
    for k, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start: start + batch_size]
        wave, lengths = pad_batch([data[i]["wave"] for i in rows])
        wave, lengths = wave.to(attributor.device), lengths.to(attributor.device)
        for m in methods:
            kw = dict((method_kwargs or {}).get(m, {}))
            if m == "random":
                kw["seed"] = seed + 1000 + k
            per_utt = attributor.attribute(wave, lengths, method=m, target=0, **kw).per_utterance()
            for j, i in enumerate(rows):
                out[m][i] = per_utt[j]
    return out  # type: ignore[return-value]


def load_utterance_items(
    data_cfg: Any, split: str, label: int, num_utterances: int, seed: int = 0, *, detector: nn.Module
) -> list[dict[str, Any]]:
    """``num_utterances`` whole utterances of ``split`` with ``label`` (1 bona fide, 0 spoof),
    drawn with ``seed``, as explanation items whose spoof mask is all False (bona fide) or
    all True (a fully spoofed utterance)."""
    from xai_lib.data.datasets import build_split

    utts = [u for u in build_split(data_cfg, split) if u.label == label]
    if num_utterances < len(utts):
        rng = np.random.default_rng(seed)
        utts = [utts[i] for i in sorted(rng.choice(len(utts), size=num_utterances, replace=False).tolist())]
    sr = int(getattr(data_cfg, "sample_rate", 16000))
    items = []
    for u in utts:
        wave = load_audio(Path(u.path), sr)
        n_frames = int(detector.num_frames(torch.tensor([wave.size])).item())
        items.append({"utt_id": u.utt_id, "wave": wave, "spoof_mask": np.full(n_frames, label == 0),
                      "label": u.label, "attack": u.attack})
    return items


def time_forward(detector: nn.Module, wave: Tensor, lengths: Tensor, repeats: int) -> float:
    """Median wall time (s) of ``repeats`` no-grad detector forward passes on one batch."""
    device = wave.device
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            detector(wave, lengths)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _warm_up(
    attributor: Attributor, wave: Tensor, methods: Sequence[str], method_kwargs: Mapping[str, Mapping[str, Any]]
) -> None:
    """Run the forward pass and every method once on a short crop (untimed start-up costs)."""
    detector = attributor.detector
    need = int(getattr(detector, "min_input_samples", 400))
    crop = wave[: max(need, min(wave.numel(), 8000))][None, :].to(attributor.device)  # <= 0.5 s
    with torch.no_grad():
        detector(crop)
    for m in methods:
        kw = dict(method_kwargs.get(m, {}))
        if m == "integrated_gradients":
            kw["n_steps"] = 2
        attributor.attribute(crop, None, method=m, target=0, **kw)


# ----------------------------------------------------------------------------- data


def _resolution_from_name(path: str | None) -> float:
    """PartialSpoof label resolution from a file name like ``eval_seglab_0.02.npy`` (default 0.02)."""
    match = re.search(r"(\d+\.\d+)\.(?:npy|pkl|pickle)$", str(path or ""))
    return float(match.group(1)) if match else 0.02


def load_explanation_set(
    data_cfg: Any,
    split: str = "eval",
    num_utterances: int | None = None,
    seed: int = 0,
    *,
    detector: nn.Module,
    resolution_s: float | None = None,
    max_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """Explanation items from the partially spoofed subset of ``split``.

    The partially spoofed utterances carry both a spoof decision to explain and the
    ground-truth spans, so the same items serve faithfulness and localization.

    Args:
        data_cfg: a :class:`~xai_lib.config.DataConfig` (``partial_{split}_protocol`` and
            ``partial_{split}_segment_labels`` set).
        split: "dev" or "eval".
        num_utterances: how many to draw (seeded, without replacement, protocol order kept);
            ``None`` = all.
        seed: the draw's seed.
        detector: gives the frame count (``num_frames``) of each utterance.
        resolution_s: segment-label resolution in seconds; ``None`` = read from the label
            file name (``..._0.02.npy``), else 0.02.
        max_seconds: crop longer utterances to this many seconds (mask cropped alike).

    Returns:
        Items ``{"utt_id", "wave" (L,) float32, "spoof_mask" (T,) bool, "label", "attack"}``.
    """
    from xai_lib.data.datasets import load_partial_split
    from xai_lib.data.protocols import spoof_frame_mask

    utts, seglab = load_partial_split(data_cfg, split)
    if num_utterances is not None:
        if num_utterances < 1:
            raise ValueError(f"num_utterances must be >= 1, got {num_utterances}")
        if num_utterances < len(utts):
            rng = np.random.default_rng(seed)
            keep = sorted(rng.choice(len(utts), size=num_utterances, replace=False).tolist())
            utts = [utts[i] for i in keep]
    if resolution_s is None:
        resolution_s = _resolution_from_name(getattr(data_cfg, f"partial_{split}_segment_labels", None))
    sr = int(getattr(data_cfg, "sample_rate", 16000))
    items: list[dict[str, Any]] = []
    for u in tqdm(utts, desc=f"loading {split} partial spoofs", leave=False):
        wave = load_audio(Path(u.path), sr)
        if max_seconds is not None:
            wave = wave[: int(max_seconds * sr)]
        n_frames = int(detector.num_frames(torch.tensor([wave.size])).item())
        mask = spoof_frame_mask(seglab[u.utt_id], n_frames, resolution_s=resolution_s)
        items.append({"utt_id": u.utt_id, "wave": wave, "spoof_mask": mask, "label": u.label, "attack": u.attack})
    logger.info("explanation set: %d partially spoofed %s utterances (%d with spoofed frames)",
                len(items), split, sum(bool(it["spoof_mask"].any()) for it in items))
    return items

"""Stage-1 detection metrics: EER, DET curve, min t-DCF, per-attack EER, score files.

Conventions follow the ASVspoof evaluation packages:

* bona fide is the **positive** class and a **higher score means more bona fide**
  (the detector's bona fide logit);
* the DET curve is evaluated at every sorted score (one operating point per trial),
  and the EER is the mean of FRR and FAR at the operating point where
  ``|FRR - FAR|`` is smallest.

Example::

    eer, threshold = utterance_eer(bona_scores, spoof_scores)
    per_attack = eer_per_attack(scores, labels, attacks)   # {"A01": ..., "pooled": ...}
    write_score_file(run_dir / "scores_eval.txt", utt_ids, scores)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence, Union

import numpy as np

__all__ = [
    "TDCFCostModel",
    "ASVSPOOF2019_COST_MODEL",
    "compute_det_curve",
    "utterance_eer",
    "compute_tdcf_curve",
    "compute_min_tdcf",
    "eer_per_attack",
    "write_score_file",
    "read_score_file",
    "ScoreFileError",
]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, Sequence[float], "torch.Tensor"]  # noqa: F821


class ScoreFileError(ValueError):
    """A score file is malformed (wrong column count, non-numeric score, duplicate id)."""


# ----------------------------------------------------------------------------- helpers


def _as_scores(values: ArrayLike, name: str) -> np.ndarray:
    """Convert scores (numpy, list, torch) to a finite 1-D float64 array or raise."""
    if hasattr(values, "detach"):  # torch.Tensor without importing torch
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: at least one score is needed to compute the metric.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(
            f"{name} contains a non-finite value ({arr[bad]}) at index {bad}; "
            "check the detector output (NaN/inf logits) before computing metrics."
        )
    return arr


# ----------------------------------------------------------------------------- DET / EER


def compute_det_curve(
    bona_scores: ArrayLike, spoof_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False rejection and false acceptance rates at every operating point.

    All scores are sorted ascending (stable sort, bona fide trials first among equal
    scores, as in the ASVspoof package). Operating point ``k`` rejects the ``k`` lowest
    scores: ``frr[k]`` is the fraction of bona fide trials among them, ``far[k]`` the
    fraction of spoof trials above them. ``thresholds[k]`` is the ``k``-th lowest score
    (``thresholds[0]`` lies just below the minimum, where nothing is rejected).

    Args:
        bona_scores: scores of bona fide trials, shape ``(N_bona,)``.
        spoof_scores: scores of spoofed trials, shape ``(N_spoof,)``.

    Returns:
        ``(frr, far, thresholds)``, each of shape ``(N_bona + N_spoof + 1,)``;
        ``frr`` rises from 0 to 1 and ``far`` falls from 1 to 0.
    """
    bona = _as_scores(bona_scores, "bona_scores")
    spoof = _as_scores(spoof_scores, "spoof_scores")
    all_scores = np.concatenate([bona, spoof])
    is_bona = np.concatenate([np.ones(bona.size), np.zeros(spoof.size)])
    order = np.argsort(all_scores, kind="mergesort")  # stable: bona first on ties
    is_bona = is_bona[order]
    sorted_scores = all_scores[order]

    n_rejected = np.arange(1, all_scores.size + 1)
    bona_rejected = np.cumsum(is_bona)  # bona trials among the k lowest scores
    spoof_accepted = spoof.size - (n_rejected - bona_rejected)

    frr = np.concatenate([[0.0], bona_rejected / bona.size])
    far = np.concatenate([[1.0], spoof_accepted / spoof.size])
    thresholds = np.concatenate([[sorted_scores[0] - 0.001], sorted_scores])
    return frr, far, thresholds


def utterance_eer(bona_scores: ArrayLike, spoof_scores: ArrayLike) -> tuple[float, float]:
    """Equal error rate, computed as the ASVspoof evaluation package does.

    Args:
        bona_scores: bona fide scores ``(N_bona,)`` (higher = more bona fide).
        spoof_scores: spoof scores ``(N_spoof,)``.

    Returns:
        ``(eer, threshold)``: ``eer`` in ``[0, 1]`` is the mean of FRR and FAR at the
        operating point minimizing ``|FRR - FAR|`` (first such point), ``threshold``
        the score at that point. Perfect separation gives 0.

    Note:
        Like the reference package, tied scores are ordered bona fide first, so scores
        with many exact ties between classes (e.g. a constant detector) give a
        pessimistic EER. Real detector logits are practically never tied.
    """
    frr, far, thresholds = compute_det_curve(bona_scores, spoof_scores)
    idx = int(np.argmin(np.abs(frr - far)))
    eer = float(np.mean([frr[idx], far[idx]]))
    return eer, float(thresholds[idx])


# ----------------------------------------------------------------------------- t-DCF


@dataclass(frozen=True)
class TDCFCostModel:
    """Priors and costs of the tandem (CM + ASV) detection cost function.

    Defaults are those of the ASVspoof 2019 evaluation package.

    Attributes:
        p_spoof: prior of a spoofing attack.
        p_tar: prior of a target (genuine, same-speaker) trial.
        p_non: prior of a non-target (zero-effort impostor) trial.
        c_miss_asv: cost of the ASV rejecting a target.
        c_fa_asv: cost of the ASV accepting a non-target.
        c_miss_cm: cost of the CM rejecting a bona fide trial.
        c_fa_cm: cost of the CM accepting a spoof.
    """

    p_spoof: float = 0.05
    p_tar: float = (1 - 0.05) * 0.99
    p_non: float = (1 - 0.05) * 0.01
    c_miss_asv: float = 1.0
    c_fa_asv: float = 10.0
    c_miss_cm: float = 1.0
    c_fa_cm: float = 10.0

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, float]) -> "TDCFCostModel":
        """Build from a dict with either our field names or the package's keys.

        The ASVspoof package spells them ``Pspoof, Ptar, Pnon, Cmiss_asv, Cfa_asv,
        Cmiss_cm, Cfa_cm``; missing keys keep the 2019 defaults.
        """
        aliases = {
            "Pspoof": "p_spoof", "Ptar": "p_tar", "Pnon": "p_non",
            "Cmiss_asv": "c_miss_asv", "Cfa_asv": "c_fa_asv",
            "Cmiss_cm": "c_miss_cm", "Cfa_cm": "c_fa_cm",
        }
        fields = set(cls.__dataclass_fields__)
        kwargs: dict[str, float] = {}
        for key, value in mapping.items():
            name = aliases.get(key, key)
            if name not in fields:
                raise ValueError(
                    f"Unknown t-DCF cost model key {key!r}; expected one of "
                    f"{sorted(fields)} or {sorted(aliases)}."
                )
            kwargs[name] = float(value)
        return cls(**kwargs)


ASVSPOOF2019_COST_MODEL = TDCFCostModel()


def _tdcf_constants(
    asv_tar: np.ndarray, asv_non: np.ndarray, asv_spoof: np.ndarray, cost: TDCFCostModel
) -> tuple[float, float, float]:
    """ASV error rates at its EER threshold folded into the constants ``C0, C1, C2``."""
    _, asv_threshold = utterance_eer(asv_tar, asv_non)
    p_fa_asv = float(np.mean(asv_non >= asv_threshold))
    p_miss_asv = float(np.mean(asv_tar < asv_threshold))
    p_miss_spoof_asv = float(np.mean(asv_spoof < asv_threshold))

    c0 = cost.p_tar * cost.c_miss_asv * p_miss_asv + cost.p_non * cost.c_fa_asv * p_fa_asv
    c1 = (
        cost.p_tar * (cost.c_miss_cm - cost.c_miss_asv * p_miss_asv)
        - cost.p_non * cost.c_fa_asv * p_fa_asv
    )
    c2 = cost.c_fa_cm * cost.p_spoof * (1.0 - p_miss_spoof_asv)
    if c1 <= 0 or c2 <= 0:
        raise ValueError(
            f"t-DCF is undefined for these ASV scores (C1={c1:.4g}, C2={c2:.4g}): "
            "C1 <= 0 means the ASV errors alone cost more than a CM miss, C2 <= 0 means "
            "the ASV rejects every spoof. Check that asv_tar/asv_non/asv_spoof are "
            "target, non-target and spoof ASV scores (higher = more target)."
        )
    return c0, c1, c2


def compute_tdcf_curve(
    bona_cm: ArrayLike,
    spoof_cm: ArrayLike,
    asv_tar: ArrayLike,
    asv_non: ArrayLike,
    asv_spoof: ArrayLike,
    cost_model: TDCFCostModel | Mapping[str, float] | None = None,
    formulation: Literal["2019", "2021"] = "2019",
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized t-DCF at every CM operating point (see :func:`compute_min_tdcf`).

    Returns:
        ``(tdcf_norm, cm_thresholds)``, both ``(N_bona_cm + N_spoof_cm + 1,)``.
    """
    if cost_model is None:
        cost = ASVSPOOF2019_COST_MODEL
    elif isinstance(cost_model, TDCFCostModel):
        cost = cost_model
    else:
        cost = TDCFCostModel.from_mapping(cost_model)
    if formulation not in ("2019", "2021"):
        raise ValueError(f"formulation must be '2019' or '2021', got {formulation!r}.")

    tar = _as_scores(asv_tar, "asv_tar")
    non = _as_scores(asv_non, "asv_non")
    spoof_asv = _as_scores(asv_spoof, "asv_spoof")
    c0, c1, c2 = _tdcf_constants(tar, non, spoof_asv, cost)

    p_miss_cm, p_fa_cm, thresholds = compute_det_curve(bona_cm, spoof_cm)
    tdcf = c1 * p_miss_cm + c2 * p_fa_cm
    if formulation == "2019":
        tdcf_norm = tdcf / min(c1, c2)
    else:
        tdcf_norm = (c0 + tdcf) / (c0 + min(c1, c2))
    return tdcf_norm, thresholds


def compute_min_tdcf(
    bona_cm: ArrayLike,
    spoof_cm: ArrayLike,
    asv_tar: ArrayLike,
    asv_non: ArrayLike,
    asv_spoof: ArrayLike,
    cost_model: TDCFCostModel | Mapping[str, float] | None = None,
    formulation: Literal["2019", "2021"] = "2019",
) -> float:
    """Normalized minimum tandem detection cost function (t-DCF).

    The ASV system's threshold is fixed at its own EER point (target vs non-target),
    giving its miss rate ``Pmiss_asv``, false-alarm rate ``Pfa_asv`` and spoof miss rate
    ``Pmiss_spoof_asv``. For a CM threshold ``s`` with miss rate ``Pmiss_cm(s)`` (bona
    fide rejected) and false-alarm rate ``Pfa_cm(s)`` (spoof accepted), the tandem cost is
    ``C0 + C1 Pmiss_cm(s) + C2 Pfa_cm(s)`` with::

        C0 = Ptar Cmiss_asv Pmiss_asv + Pnon Cfa_asv Pfa_asv          (ASV-only cost)
        C1 = Ptar (Cmiss_cm - Cmiss_asv Pmiss_asv) - Pnon Cfa_asv Pfa_asv
        C2 = Cfa_cm Pspoof (1 - Pmiss_spoof_asv)

    * ``formulation="2019"`` (ASVspoof 2019 package, the default): ``C0`` is dropped and
      the cost is divided by ``min(C1, C2)``, the cost of a CM that accepts or rejects
      everything. A perfect CM scores 0 (the floor of this formulation), an
      uninformative one 1.
    * ``formulation="2021"`` (revised t-DCF of ASVspoof 2021): ``(C0 + C1 Pmiss_cm +
      C2 Pfa_cm) / (C0 + min(C1, C2))``. A perfect CM scores the ASV-only floor
      ``C0 / (C0 + min(C1, C2))``.

    The minimum is taken over all CM operating points of :func:`compute_det_curve`.

    Args:
        bona_cm: CM scores of bona fide trials ``(N_bona,)`` (higher = bona fide).
        spoof_cm: CM scores of spoofed trials ``(N_spoof,)``.
        asv_tar: ASV scores of target trials ``(N_tar,)`` (higher = target).
        asv_non: ASV scores of non-target trials ``(N_non,)``.
        asv_spoof: ASV scores of spoofed trials ``(N_spoof_asv,)``.
        cost_model: priors and costs; ``None`` = ASVspoof 2019 defaults
            (Pspoof 0.05, Ptar 0.95*0.99, Pnon 0.95*0.01, Cmiss 1, Cfa 10 for ASV and CM).
        formulation: ``"2019"`` or ``"2021"`` as above.

    Returns:
        The normalized min t-DCF (a non-negative float).
    """
    tdcf_norm, _ = compute_tdcf_curve(
        bona_cm, spoof_cm, asv_tar, asv_non, asv_spoof, cost_model, formulation
    )
    return float(np.min(tdcf_norm))


# ----------------------------------------------------------------------------- per attack


def eer_per_attack(
    scores: Mapping[str, float],
    labels: Mapping[str, int],
    attacks: Mapping[str, str],
) -> dict[str, float]:
    """EER of each attack's spoofs against all bona fide trials, plus the pooled EER.

    Args:
        scores: utterance id -> detector score (higher = more bona fide).
        labels: utterance id -> 1 for bona fide, 0 for spoof. Must cover every scored id;
            extra ids are ignored (a scored subset of a protocol is fine).
        attacks: utterance id -> attack name (e.g. ``"A07"``); needed for every scored
            spoof, ignored for bona fide.

    Returns:
        ``{attack: eer, ..., "pooled": eer}`` with attacks in sorted order; EERs in [0, 1].
    """
    bona: list[float] = []
    spoof_by_attack: dict[str, list[float]] = {}
    for utt, score in scores.items():
        if utt not in labels:
            raise KeyError(
                f"Utterance {utt!r} has a score but no label; pass labels for every scored "
                "utterance (1 = bona fide, 0 = spoof)."
            )
        label = int(labels[utt])
        if label == 1:
            bona.append(float(score))
        elif label == 0:
            if utt not in attacks:
                raise KeyError(
                    f"Spoofed utterance {utt!r} has no attack name in `attacks`; "
                    "pass the protocol's system id (e.g. 'A07') for every spoof."
                )
            spoof_by_attack.setdefault(str(attacks[utt]), []).append(float(score))
        else:
            raise ValueError(
                f"Label of utterance {utt!r} is {labels[utt]!r}; expected 1 (bona fide) "
                "or 0 (spoof)."
            )
    if not bona:
        raise ValueError("No bona fide utterance among the scored ones; the EER needs both classes.")
    if not spoof_by_attack:
        raise ValueError("No spoofed utterance among the scored ones; the EER needs both classes.")

    result: dict[str, float] = {}
    for attack in sorted(spoof_by_attack):
        result[attack] = utterance_eer(bona, spoof_by_attack[attack])[0]
    pooled = [s for values in spoof_by_attack.values() for s in values]
    result["pooled"] = utterance_eer(bona, pooled)[0]
    return result


# ----------------------------------------------------------------------------- score files


def write_score_file(
    path: str | Path, utt_ids: Iterable[str], scores: ArrayLike
) -> Path:
    """Write an ASVspoof-style score file: one ``UTT SCORE`` line per utterance.

    Args:
        path: output file; parent directories are created.
        utt_ids: utterance ids (no whitespace), ``N`` of them.
        scores: ``(N,)`` finite scores, written with 6 decimals.

    Returns:
        The path written.
    """
    path = Path(path)
    ids = [str(u) for u in utt_ids]
    values = _as_scores(scores, "scores") if len(ids) else np.zeros(0)
    if len(ids) != values.size:
        raise ValueError(
            f"write_score_file({path}): {len(ids)} utterance ids but {values.size} scores; "
            "pass one score per id."
        )
    for utt in ids:
        if not utt or any(ch.isspace() for ch in utt):
            raise ValueError(
                f"write_score_file({path}): utterance id {utt!r} is empty or contains "
                "whitespace, which would break the 'UTT SCORE' format."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for utt, value in zip(ids, values):
            fh.write(f"{utt} {value:.6f}\n")
    logger.info("Wrote %d scores to %s", len(ids), path)
    return path


def read_score_file(path: str | Path) -> dict[str, float]:
    """Read a ``UTT SCORE`` score file (blank lines are skipped).

    Args:
        path: the score file.

    Returns:
        Utterance id -> score, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ScoreFileError: a line does not have exactly two columns, its score is not a
            finite number, or an id repeats; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Score file not found: {path}")
    result: dict[str, float] = {}
    first_line: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ScoreFileError(
                    f"{path}:{lineno}: expected 2 columns 'UTT SCORE', got {len(parts)}: "
                    f"{line.strip()!r}"
                )
            utt, text = parts
            try:
                value = float(text)
            except ValueError:
                raise ScoreFileError(
                    f"{path}:{lineno}: score {text!r} of {utt!r} is not a number."
                ) from None
            if not math.isfinite(value):
                raise ScoreFileError(f"{path}:{lineno}: score of {utt!r} is {text!r}, not finite.")
            if utt in result:
                raise ScoreFileError(
                    f"{path}:{lineno}: utterance {utt!r} already scored on line "
                    f"{first_line[utt]}; each id must appear once."
                )
            result[utt] = value
            first_line[utt] = lineno
    return result

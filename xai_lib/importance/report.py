"""Stage 2's evaluation report: importance statistics, localisation of the partially
spoofed subsets, loss and similarity figures -> ``metrics.json["stage2"]`` (notebook 02).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xai_lib.config import Stage2Config
from xai_lib.data.datasets import EvalDataset, build_split, collate_padded
from xai_lib.data.protocols import Utterance
from xai_lib.importance.inference import LoadedXAI
from xai_lib.importance.checkpoint import load_xai
from xai_lib.importance.training import LOSS_TERMS, Stage2Result, load_frozen_detector

__all__ = ["stage2_report"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- report


def _loss_figure(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    from xai_lib import plots

    fig, axes = plt.subplots(2, 4, figsize=(15, 6))
    for ax in axes.ravel()[len(LOSS_TERMS):]:
        ax.set_visible(False)
    for ax, term in zip(axes.ravel(), LOSS_TERMS):
        plots.plot_loss_curves({f"train {term}": history.get(f"train_{term}", []),
                                f"dev {term}": history.get(f"dev_{term}", [])}, ax=ax)
        ax.set_title(term if term != "total" else "total (weighted objective)")
        ax.set_ylabel("loss")
    fig.suptitle("Stage 2 loss terms per epoch (unweighted)")
    fig.tight_layout()
    plots.save_figure(fig, path)


def _similarity_figure(sims: dict[str, np.ndarray], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    from xai_lib import plots

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (proto, col) in zip(axes, (("p_spoof", 0), ("p_bona", 1))):
        data = {name: v[:, col] for name, v in sims.items() if v.size}
        if data:
            plots.plot_similarity_distributions(data, ax=ax)
        ax.set_title(f"cosine similarity to {proto}")
    fig.suptitle(title)
    fig.tight_layout()
    plots.save_figure(fig, path)


def _loader(utts: Sequence[Utterance], cfg: Stage2Config, crop: int | None) -> DataLoader:
    ds = EvalDataset(list(utts), sample_rate=cfg.data.sample_rate, crop_samples=crop, on_bad_audio=cfg.data.on_bad_audio)
    return DataLoader(ds, batch_size=cfg.training.eval_batch_size, shuffle=False, collate_fn=collate_padded,
                      num_workers=cfg.data.num_workers)


def _importance_stats(
    xai: LoadedXAI, detector: nn.Module, utts: Sequence[Utterance], cfg: Stage2Config, progress: bool
) -> tuple[dict[str, float], dict[str, np.ndarray], list[tuple[int, np.ndarray]]]:
    """One pass over ``utts``: mean w on bona fide vs spoof utterances, the spread of w over all
    valid frames, the prototype similarities of each class's frames (the similarity figure
    when there is no partially spoofed subset), and ``(label, w)`` of every utterance."""
    device = next(detector.parameters()).device
    per_utt = {0: [], 1: []}
    frames: list[np.ndarray] = []
    labelled: list[tuple[int, np.ndarray]] = []
    groups: dict[str, list[np.ndarray]] = {"bona fide utterances": [], "spoof utterances": []}
    for batch in tqdm(_loader(utts, cfg, cfg.data.eval_crop_samples), desc="stage2 importance (dev)", leave=False,
                      disable=not progress):
        if len(batch["labels"]) == 0:
            continue
        out = xai.explain(detector, batch["wave"].to(device), batch["lengths"].to(device))
        w, m, sims = out.importance.cpu(), out.frame_mask.cpu(), out.similarities.cpu()
        for i, y in enumerate(batch["labels"].tolist()):
            wi = w[i][m[i]].numpy()
            frames.append(wi)
            labelled.append((int(y), wi))
            if y in per_utt and wi.size:
                per_utt[y].append(float(wi.mean()))
            groups["bona fide utterances" if y == 1 else "spoof utterances"].append(sims[i][m[i]].numpy())
    similarities = {k: np.concatenate(v) if v else np.zeros((0, 2)) for k, v in groups.items()}
    all_w = np.concatenate(frames) if frames else np.zeros(0)
    if all_w.size == 0:
        return {}, similarities, labelled
    p5, p50, p95 = np.percentile(all_w, [5, 50, 95])
    return {
        "importance_mean_bonafide": float(np.mean(per_utt[1])) if per_utt[1] else float("nan"),
        "importance_mean_spoof": float(np.mean(per_utt[0])) if per_utt[0] else float("nan"),
        "importance_std": float(all_w.std()),
        "importance_p05": float(p5),
        "importance_p50": float(p50),
        "importance_p95": float(p95),
        "importance_frac_above_0_5": float((all_w > 0.5).mean()),
        "importance_num_utts": len(frames),
    }, similarities, labelled


def _partial_localization(
    xai: LoadedXAI, detector: nn.Module, cfg: Stage2Config, split: str, progress: bool
) -> tuple[dict[str, float], dict[str, np.ndarray], tuple[list[np.ndarray], list[np.ndarray]]] | None:
    """Localisation metrics of w (and of the prototype similarities) on the partial ``split``,
    the similarities for the figure, and ``(w, spoof mask)`` of every utterance.

    Returns None when the partially spoofed subset is not configured or not on disk.
    """
    from xai_lib.data.audio import pad_batch
    from xai_lib.explanation.evaluation import load_explanation_set
    from xai_lib.explanation.metrics import localization_metrics, localization_per_attack

    if not (getattr(cfg.data, f"partial_{split}_protocol") and getattr(cfg.data, f"partial_{split}_segment_labels")):
        return None
    try:
        items = load_explanation_set(cfg.data, split, detector=detector)
    except (FileNotFoundError, ValueError) as exc:  # ProtocolError/MissingAudioError: not available here
        log.warning("no localisation on the partially spoofed %s subset: %s", split, exc)
        return None
    if not items:
        return None
    device = next(detector.parameters()).device
    weights, sim_scores, masks, attacks = [], [], [], []
    bona_frames, spoof_frames = [], []
    bs = cfg.training.eval_batch_size
    for start in tqdm(range(0, len(items), bs), desc=f"stage2 localisation ({split})", leave=False,
                      disable=not progress):
        chunk = items[start : start + bs]
        wave, lengths = pad_batch([torch.as_tensor(it["wave"]) for it in chunk])
        out = xai.explain(detector, wave.to(device), lengths.to(device))
        for i, it in enumerate(chunk):
            n = int(out.frame_mask[i].sum())
            w = out.importance[i, :n].cpu().numpy()
            s = out.similarities[i, :n].cpu().numpy()  # (n, 2): spoof, bona
            mask = np.asarray(it["spoof_mask"], dtype=bool)[:n]
            s = s[: mask.size]
            weights.append(w)
            sim_scores.append(s[:, 0] - s[:, 1])
            masks.append(mask)
            attacks.append(it.get("attack"))
            spoof_frames.append(s[mask])
            bona_frames.append(s[~mask])
    metrics = localization_metrics(weights, masks)
    sim_metrics = localization_metrics(sim_scores, masks)
    result = {
        "loc_auc": metrics["loc_auc"],
        "loc_eer": metrics["loc_eer"],
        "pointing_game": metrics["pointing_game"],
        "n_utts": len(items),
        "n_frames": metrics["n_frames"],
        "spoof_frame_fraction": float(np.concatenate(masks).mean()),
        "loc_auc_similarity": sim_metrics["loc_auc"],
        # per attack: seen vs unseen attacks differ widely (a detector cannot point at what it misses)
        "loc_auc_per_attack": localization_per_attack(weights, masks, attacks),
    }
    sims = {"bona fide frames": np.concatenate(bona_frames), "spoof-span frames": np.concatenate(spoof_frames)}
    return result, sims, (weights, masks)


def stage2_report(
    result: Stage2Result,
    cfg: Stage2Config,
    run_dir: str | Path,
    progress: bool = True,
    max_dev_utts: int | None = 1000,
) -> dict[str, Any]:
    """Evaluate a trained Stage-2 module; the values for ``metrics.json["stage2"]``.

    Measures, with the saved (best-dev-loss) module on its frozen detector:

    * the final loss terms (train and dev) and the best dev loss;
    * ``importance_mean_bonafide`` / ``importance_mean_spoof``: mean ``w`` per utterance on the
      dev split, averaged per class (bona fide should be low);
    * the spread of ``w`` over all valid dev frames (std, 5/50/95th percentiles, fraction
      above 0.5): evidence that the importance did not collapse to a constant;
    * localisation of the spliced spans of the partially spoofed dev and eval subsets:
      frame-level ROC-AUC and EER of ``w`` against the ground-truth spoof frames, the
      pointing game, and the ROC-AUC of the prototype evidence ``cos(h, p_spoof) - cos(h, p_bona)``.

    Figures: ``run_dir/figures/stage2_loss_terms.png`` (every term per epoch, train and dev)
    and ``stage2_similarity_distributions.png`` (prototype similarities on bona fide frames vs
    spoof-span frames of the partially spoofed dev subset; dev bona fide vs spoof utterances
    when no partial subset exists).

    Args:
        result: what :func:`train_stage2` returned.
        cfg: the same config.
        run_dir: the run directory (figures go to ``run_dir/figures``).
        progress: show tqdm progress bars.
        max_dev_utts: at most this many dev utterances (stratified, seeded) for the ``w``
            statistics; ``None`` = all.

    Returns:
        A JSON-serialisable dict; scalars at the top level, per-term losses under
        ``final_losses``, localisation per subset under ``localization``.
    """
    from xai_lib.data.datasets import subsample_utterances

    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.training.device != "cpu" else "cpu")
    detector = load_frozen_detector(result.detector_path, cfg.detector.config, device)
    xai = load_xai(result.checkpoint, detector=detector)
    hist = result.history
    metrics: dict[str, Any] = {
        "checkpoint": str(result.checkpoint),
        "detector": str(result.detector_path),
        "detector_sha256": result.detector_sha256,
        "representation": xai.representation,
        "prototype_mode": xai.config.prototype_mode,
        "lambda_fidelity": xai.config.lambda_fidelity,
        "epochs_completed": result.epochs_completed,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_seconds": result.train_seconds,
        "final_losses": {
            split: {k: hist[f"{split}_{k}"][-1] for k in LOSS_TERMS if hist.get(f"{split}_{k}")}
            for split in ("train", "dev")
        },
    }
    if result.best_epoch and hist.get("dev_total"):
        metrics["dev_loss"] = hist["dev_total"][result.best_epoch - 1]
    if hist:
        _loss_figure(hist, fig_dir / "stage2_loss_terms.png")

    dev_utts = subsample_utterances(build_split(cfg.data, "dev"), max_dev_utts)
    stats, dev_similarities, dev_w = _importance_stats(xai, detector, dev_utts, cfg, progress)
    metrics.update(stats)

    metrics["localization"] = {}
    sims_for_figure: dict[str, np.ndarray] | None = None
    partial_dev: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for split in ("dev", "eval"):
        found = _partial_localization(xai, detector, cfg, split, progress)
        if found is None:
            continue
        loc, sims, weights_masks = found
        if split == "dev":
            partial_dev = weights_masks
        metrics["localization"][f"partial_{split}"] = loc
        for key in ("loc_auc", "loc_eer", "pointing_game"):
            metrics[f"{key}_partial_{split}"] = loc[key]
        if sims_for_figure is None:
            sims_for_figure, sims_title = sims, f"prototype similarities on the partially spoofed {split} subset"
    if sims_for_figure is None:  # no partial subset: whole bona fide vs spoof dev utterances
        sims_for_figure, sims_title = dev_similarities, \
            "prototype similarities on dev frames (bona fide vs spoof utterances)"
    _similarity_figure(sims_for_figure, sims_title, fig_dir / "stage2_similarity_distributions.png")
    if xai.calibration is not None:
        metrics.update(_calibrated_dev(xai.calibration, dev_w, partial_dev, detector.frame_hop_s))
        metrics["false_flag_rate_eval"] = eval_false_flag_rate(xai, detector, cfg, max_utts=max_dev_utts)
    metrics["removal_baseline_p_spoof"] = removal_baseline(detector, xai, dev_utts, cfg)
    return metrics


def _calibrated_dev(
    calibration: dict[str, Any],
    dev_w: list[tuple[int, np.ndarray]],
    partial: tuple[list[np.ndarray], list[np.ndarray]],
    frame_hop_s: float,
) -> dict[str, Any]:
    """``calibrated_dev`` (at the stored threshold, on the dev split and its partially spoofed
    subset) and ``importance_frac_above_threshold`` (frames of spoof dev utterances above it)."""
    from xai_lib.explanation.calibration import calibrated_metrics, frame_eer_by_resolution

    tau = float(calibration["threshold"])
    bona = [w for y, w in dev_w if y == 1]
    spoof = [w for y, w in dev_w if y == 0]
    weights, masks = partial
    calibrated = calibrated_metrics(tau, bona, weights, masks)
    # every dev utterance: bona fide (no spoofed frame), fully spoofed (all), partially spoofed (spans)
    everything = [*bona, *spoof, *weights]
    truth = [*(np.zeros(w.size, bool) for w in bona), *(np.ones(w.size, bool) for w in spoof), *masks]
    calibrated["frame_eer_by_resolution"] = frame_eer_by_resolution(everything, truth, frame_hop_s)
    flat_spoof = np.concatenate(spoof) if spoof else np.zeros(0)
    return {
        "calibrated_dev": calibrated,
        "importance_frac_above_threshold": float(np.mean(flat_spoof > tau)) if flat_spoof.size else None,
    }


def eval_false_flag_rate(xai: LoadedXAI, detector: nn.Module, cfg: Stage2Config, max_utts: int | None = 1000) -> float | None:
    """Share of the bona fide eval utterances' frames above the stored threshold (calibrated on
    dev): does the guarantee carry over to unseen recordings? ``None`` without bona fide eval data."""
    from xai_lib.data.datasets import subsample_utterances
    from xai_lib.importance.inference import importance_per_utterance

    if not cfg.data.eval_protocol or xai.calibration is None:
        return None
    bona = subsample_utterances([u for u in build_split(cfg.data, "eval") if u.label == 1], max_utts)
    if not bona:
        return None
    ds = EvalDataset(bona, sample_rate=cfg.data.sample_rate, crop_samples=cfg.data.eval_crop_samples,
                     on_bad_audio=cfg.data.on_bad_audio, min_samples=detector.min_input_samples)
    waves = [it["wave"] for it in (ds[i] for i in range(len(ds))) if it is not None]
    w = np.concatenate(importance_per_utterance(xai, detector, waves, cfg.training.eval_batch_size))
    return float(np.mean(w > float(xai.calibration["threshold"])))


@torch.no_grad()
def removal_baseline(detector: nn.Module, xai: LoadedXAI, utts: Sequence[Utterance], cfg: Stage2Config,
                     max_per_class: int = 64) -> dict[str, float | None]:
    """The detector's mean spoof probability of dev utterances with every frame removed (as the
    fidelity term removes frames), per class, beside that of the bona fide utterances as they are.

    Returns:
        ``{"bonafide", "spoof", "bonafide_as_is", "removal"}``: a neutral removal puts both
        classes near ``bonafide_as_is``.
    """
    from xai_lib.detector.removal import SPOOF_COLUMN

    device = next(detector.parameters()).device
    reference = xai.removal_reference
    by_class: dict[int, list[Utterance]] = {0: [u for u in utts if u.label == 0][:max_per_class],
                                            1: [u for u in utts if u.label == 1][:max_per_class]}
    sums = {"removed": {0: [], 1: []}, "as_is": {0: [], 1: []}}
    for y, group in by_class.items():
        for batch in _loader(group, cfg, cfg.data.eval_crop_samples):
            if len(batch["labels"]) == 0:
                continue
            ssl, mask = detector.frontend(batch["wave"].to(device), batch["lengths"].to(device))
            none = torch.zeros(mask.shape, device=device)
            if reference is None:
                removed = detector.backend(ssl, mask, frame_weights=none).logits
            else:
                removed = detector.backend(reference.remove(ssl, none), mask).logits
            sums["removed"][y] += removed.float().softmax(-1)[:, SPOOF_COLUMN].tolist()
            sums["as_is"][y] += detector.backend(ssl, mask).logits.float().softmax(-1)[:, SPOOF_COLUMN].tolist()

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {"bonafide": mean(sums["removed"][1]), "spoof": mean(sums["removed"][0]),
            "bonafide_as_is": mean(sums["as_is"][1]), "removal": xai.config.removal}

"""Stage 3 in one call: attributions of every method, their metrics, figures.

Notebook 03 and the benchmark both use :func:`run_stage3`; the viewer is built from the
same items with :func:`viewer_items` and :func:`similarity_fn`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from xai_lib import plots
from xai_lib.cpu import keep_freed_memory
from xai_lib.explanation.methods import METHOD_REGISTRY, METHODS
from xai_lib.explanation.evaluation import applicable_methods, evaluate_methods, method_not_applicable

__all__ = [
    "STAGE3_KEYS",
    "run_data_config",
    "use_run_threads",
    "run_stage3",
    "calibrate_methods",
    "calibrated_table",
    "viewer_items",
    "similarity_fn",
    "metrics_table",
]

log = logging.getLogger(__name__)

#: The per-method keys of ``metrics.json["stage3"]["methods"][NAME]``.
STAGE3_KEYS = ("deletion_auc", "insertion_auc", "loc_auc", "loc_eer", "pointing_game", "ms_per_utt", "cost_vs_forward")


def _run_config(run_dir: str | Path, data_root: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """The config the run trained with: ``run_dir/config_stage2.yaml``, else ``config_stage1.yaml``
    (``data_root`` and ``data.*`` ``overrides`` applied); ``None`` when it holds neither."""
    from xai_lib.config import Stage1Config, Stage2Config, notebook_config

    run_dir = Path(run_dir)
    for name, schema in (("config_stage2.yaml", Stage2Config), ("config_stage1.yaml", Stage1Config)):
        if (run_dir / name).is_file():
            return notebook_config(run_dir / name, schema, overrides, data_root=data_root)
    return None


def run_data_config(run_dir: str | Path, data_root: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """The data Stage 3 explains: the ``data`` section the run trained with.

    Read from ``run_dir/config_stage2.yaml`` (else ``config_stage1.yaml``), so protocols,
    partially spoofed subsets and segment labels in non-default places reach Stage 3 as
    they reached Stages 1 and 2; ``data_root`` and ``data.*`` ``overrides`` still apply.

    Raises:
        FileNotFoundError: the run holds neither config (the message says what to run).
        ConfigError: a bad override (naming it).
    """
    cfg = _run_config(run_dir, data_root, overrides)
    if cfg is None:
        raise FileNotFoundError(
            f"{run_dir} holds neither config_stage2.yaml nor config_stage1.yaml: Stage 3 explains the data of a "
            "trained run. Run notebooks 01 and 02 (or the pipeline's --stage1 --stage2) into this run directory first."
        )
    return cfg.data


def use_run_threads(run_dir: str | Path, num_threads: int | None = None) -> int:
    """Set torch's CPU threads for Stage 3: ``num_threads``, else the run's own
    ``training.num_threads`` (``config_stage2.yaml``, else ``config_stage1.yaml``; the demo: null),
    else torch's default; and keep freed memory for reuse (:func:`xai_lib.cpu.keep_freed_memory`).
    Returns the number of threads in use."""
    keep_freed_memory()
    if num_threads is None:
        cfg = _run_config(run_dir)
        num_threads = None if cfg is None else cfg.training.num_threads
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()


def _spans(mask: np.ndarray | None, hop: float) -> list[tuple[float, float]] | None:
    if mask is None:
        return None
    return plots.spans_above_threshold(np.asarray(mask, dtype=float), 0.5, hop)


def viewer_items(items: Sequence[Mapping[str, Any]], frame_hop_s: float) -> list[dict[str, Any]]:
    """Explanation items → viewer items (ground-truth spans in seconds from the frame masks)."""
    return [
        {
            "utt_id": it["utt_id"],
            "wave": np.asarray(it["wave"], dtype=np.float32),
            "label": it.get("label"),
            "score": it.get("score"),
            "attack": it.get("attack"),
            "spoof_spans_s": _spans(it.get("spoof_mask"), frame_hop_s),
        }
        for it in items
    ]


def similarity_fn(detector: torch.nn.Module, xai: Any) -> Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]]:
    """``item -> (sim_bona (T,), sim_spoof (T,))`` from the Stage-2 prototypes."""

    @torch.no_grad()
    def fn(item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        wave = torch.as_tensor(np.asarray(item["wave"], dtype=np.float32))[None]
        sims = xai.frame_similarities(detector, wave, torch.tensor([wave.shape[1]]))[0]  # (T, 2): spoof, bona
        return sims[:, 1].cpu().numpy(), sims[:, 0].cpu().numpy()

    return fn


def metrics_table(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of the Stage-3 metrics, one row per method."""

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"

    head = "| method | " + " | ".join(STAGE3_KEYS) + " |"
    rule = "|" + "---|" * (len(STAGE3_KEYS) + 1)
    rows = [f"| {m} | " + " | ".join(fmt(r.get(k)) for k in STAGE3_KEYS) + " |" for m, r in methods.items()]
    return "\n".join([head, rule, *rows])


def run_stage3(
    detector: torch.nn.Module,
    xai: Any | None,
    items: Sequence[Mapping[str, Any]],
    run_dir: str | Path,
    methods: Sequence[str] = METHODS,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    num_figures: int = 2,
    seed: int = 0,
    progress: bool = True,
    calibration_items: Sequence[Mapping[str, Any]] = (),
    whole_items: Sequence[Mapping[str, Any]] = (),
    false_flag_rate: float = 0.01,
) -> dict[str, Any]:
    """Attribute ``items`` with every method, measure, and save figures under ``run_dir/figures``.

    Deletion/insertion remove frames as Stage 2's fidelity term does (the bona fide reference
    stored with ``xai``, else zeroing). With ``calibration_items`` (bona fide dev utterances),
    every method is calibrated the same way on its raw scores (:mod:`xai_lib.explanation.calibration`)
    and measured at its threshold on ``items`` (partially spoofed) and ``whole_items`` (bona fide
    and fully spoofed utterances of the same split); a method with a fixed threshold
    (``grad_cam_minmax05``: 0.5 on per-utterance min-max scores) is measured at that one.

    Returns:
        The ``metrics.json["stage3"]`` values: ``{"methods": {NAME: {STAGE3_KEYS..., "calibrated"}},
        "num_utterances", "figures", "removal"}``, and ``"not_applicable": {NAME: reason}`` for
        the methods left out because they cannot explain this detector (e.g. ``attention_rollout``
        on an AASIST back end).
    """
    methods = [m for m in methods if m != "importance" or xai is not None]
    not_applicable = {m: why for m in methods if (why := method_not_applicable(detector, m)) is not None}
    methods = applicable_methods(detector, methods)
    fig_dir = Path(run_dir) / "figures"
    reference = getattr(xai, "removal_reference", None)
    results = evaluate_methods(
        detector, xai, list(items), methods=methods, seed=seed, progress=progress, method_kwargs=dict(method_kwargs or {}),
        reference=reference,
    )
    figures: list[str] = []
    fig = plots.plot_deletion_insertion({m: r for m, r in results.items() if r.get("deletion_curve") is not None})
    figures.append(str(plots.save_figure(fig, fig_dir / "stage3_deletion_insertion.png")))

    hop = float(detector.frame_hop_s)
    shown = [k for k, it in enumerate(items) if it.get("spoof_mask") is not None and np.any(it["spoof_mask"])][:num_figures]
    sims = similarity_fn(detector, xai) if xai is not None else None
    for k in shown:  # the attributions evaluate_methods computed, not a second pass
        it = items[k]
        attrs = {m: results[m]["attributions"][k] for m in methods}
        spans = _spans(it["spoof_mask"], hop)
        fig = plots.plot_method_comparison(it["wave"], attrs, frame_hop_s=hop, spoof_spans_s=spans)
        figures.append(str(plots.save_figure(fig, fig_dir / f"stage3_methods_{it['utt_id']}.png")))
        if xai is not None and sims is not None:
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True, layout="constrained")
            plots.plot_importance_overlay(it["wave"], attrs["importance"], hop, ax=axes[0], spoof_spans_s=spans, threshold=0.5)
            axes[0].set_title(f"{it['utt_id']}: learned importance over the log-mel spectrogram")
            plots.plot_waveform(it["wave"], ax=axes[1], spoof_spans_s=spans)
            sim_bona, sim_spoof = sims(it)
            plots.plot_prototype_similarity(sim_bona, sim_spoof, hop, ax=axes[2], spoof_spans_s=spans)
            figures.append(str(plots.save_figure(fig, fig_dir / f"stage3_overlay_{it['utt_id']}.png")))
    table = {m: {k: results[m].get(k) for k in (*STAGE3_KEYS, "loc_auc_per_attack")} for m in results}
    log.info("Stage 3 metrics\n%s", metrics_table(table))
    out: dict[str, Any] = {"methods": table, "num_utterances": len(items), "figures": figures,
                           "removal": "bonafide" if reference is not None else "zero"}
    if not_applicable:
        out["not_applicable"] = not_applicable
    if calibration_items:
        calibrated = calibrate_methods(detector, xai, methods, results, items, calibration_items, whole_items,
                                       false_flag_rate, method_kwargs, seed)
        for m, values in calibrated.items():
            table[m]["calibrated"] = values
        log.info("Stage 3 calibrated answers\n%s", calibrated_table(table))
        fig = plot_calibrated(table)
        figures.append(str(plots.save_figure(fig, fig_dir / "stage3_calibrated.png")))
        out.update(calibration_utterances=len(calibration_items), whole_utterances=len(whole_items),
                   false_flag_rate=false_flag_rate)
    return out


def calibrate_methods(
    detector: torch.nn.Module,
    xai: Any | None,
    methods: Sequence[str],
    results: Mapping[str, Mapping[str, Any]],
    items: Sequence[Mapping[str, Any]],
    calibration_items: Sequence[Mapping[str, Any]],
    whole_items: Sequence[Mapping[str, Any]],
    false_flag_rate: float,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Every method calibrated on its raw scores of ``calibration_items`` and measured at its threshold.

    A method that comes with a fixed threshold (:attr:`~xai_lib.explanation.methods.AttributionMethod.fixed_threshold`,
    ``grad_cam_minmax05``: 0.5 on per-utterance min-max scores) is measured at that threshold
    instead, with the same metrics, and is not attributed on ``calibration_items``.

    Returns:
        ``{method: {"threshold", "threshold_source", "false_flag_rate", "precision", "recall",
        "f1", "iou", "frame_eer_by_resolution", "f1_per_attack"}}``: ``threshold_source`` is
        ``"calibrated"`` (the ``1 - false_flag_rate`` quantile of the bona fide calibration
        frames) or ``"fixed"``; the false-flag rate over the bona fide ``whole_items``,
        precision/recall/F1/IoU over ``items`` (and F1 over each attack's), the pooled segment
        EER over ``items`` and ``whole_items``.
    """
    from xai_lib.explanation.calibration import calibrated_metrics, frame_eer_by_resolution, frame_threshold
    from xai_lib.explanation.evaluation import attribute_items

    fixed = {m: METHOD_REGISTRY[m].fixed_threshold for m in methods}
    cal = attribute_items(detector, xai, calibration_items, [m for m in methods if fixed[m] is None], method_kwargs,
                          seed=seed)
    whole = attribute_items(detector, xai, whole_items, methods, method_kwargs, seed=seed) if whole_items else {}
    masks = [np.asarray(it["spoof_mask"], dtype=bool) for it in items]
    whole_masks = [np.asarray(it["spoof_mask"], dtype=bool) for it in whole_items]
    bona_rows = [i for i, it in enumerate(whole_items) if it.get("label") == 1]
    out = {}
    for m in methods:
        tau = frame_threshold(cal[m], false_flag_rate) if fixed[m] is None else float(fixed[m])
        partial = results[m]["attributions"]
        extra = whole.get(m, [])
        values = calibrated_metrics(tau, [extra[i] for i in bona_rows], partial, masks)
        values["threshold_source"] = "calibrated" if fixed[m] is None else "fixed"
        attacks = sorted({str(it.get("attack")) for it in items} - {"None", "-"})
        values["f1_per_attack"] = {
            a: calibrated_metrics(tau, [], [s for s, it in zip(partial, items) if str(it.get("attack")) == a],
                                  [mk for mk, it in zip(masks, items) if str(it.get("attack")) == a])["f1"]
            for a in attacks
        }
        values["frame_eer_by_resolution"] = frame_eer_by_resolution([*partial, *extra], [*masks, *whole_masks],
                                                                     float(detector.frame_hop_s))
        out[m] = values
    return out


def calibrated_table(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of the calibrated answers, one row per method (a fixed threshold marked "(fixed)")."""

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    head = "| method | threshold | false-flag rate | precision | recall | F1 | IoU | frame EER 20 ms | 80 ms | 320 ms |"
    rows = [head, "|" + "---|" * 10]
    for m, r in methods.items():
        c = r.get("calibrated")
        if not c:
            continue
        eer = c["frame_eer_by_resolution"]
        tau = fmt(c["threshold"]) + (" (fixed)" if c.get("threshold_source") == "fixed" else "")
        rows.append(f"| {m} | {tau} | " + " | ".join(fmt(c[k]) for k in ("false_flag_rate", "precision", "recall",
                                                                             "f1", "iou"))
                    + f" | {fmt(eer.get('0.02'))} | {fmt(eer.get('0.08'))} | {fmt(eer.get('0.32'))} |")
    return "\n".join(rows)


def plot_calibrated(methods: Mapping[str, Mapping[str, Any]]):
    """Calibrated F1 / IoU per method, and the pooled segment EER against the resolution."""
    import matplotlib.pyplot as plt

    names = [m for m, r in methods.items() if r.get("calibrated")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("f1", "F1"), ("iou", "IoU"))):
        axes[0].bar(x + 0.4 * k - 0.2, [methods[m]["calibrated"][key] or 0.0 for m in names], width=0.4, label=label)
    axes[0].set_xticks(x, names, rotation=20, ha="right")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("frames above the calibrated threshold vs the spoofed frames")
    axes[0].legend()
    for m in names:
        eer = methods[m]["calibrated"]["frame_eer_by_resolution"]
        res = [float(r) for r in eer if eer[r] is not None]
        axes[1].plot(res, [100 * eer[f"{r:g}"] for r in res], marker="o", label=m)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("segment resolution (s)")
    axes[1].set_ylabel("pooled segment EER (%)")
    axes[1].set_title("PartialSpoof-style frame EER (lower is better)")
    axes[1].legend(fontsize="small")
    return fig

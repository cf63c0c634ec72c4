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
from xai_lib.explanation.methods import METHODS
from xai_lib.explanation.evaluation import evaluate_methods

__all__ = ["STAGE3_KEYS", "run_data_config", "run_stage3", "viewer_items", "similarity_fn", "metrics_table"]

log = logging.getLogger(__name__)

#: The per-method keys of ``metrics.json["stage3"]["methods"][NAME]``.
STAGE3_KEYS = ("deletion_auc", "insertion_auc", "loc_auc", "loc_eer", "pointing_game", "ms_per_utt", "cost_vs_forward")


def run_data_config(run_dir: str | Path, data_root: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """The data Stage 3 explains: the ``data`` section the run trained with.

    Read from ``run_dir/config_stage2.yaml`` (else ``config_stage1.yaml``), so protocols,
    partially spoofed subsets and segment labels in non-default places reach Stage 3 as
    they reached Stages 1 and 2; ``data_root`` and ``data.*`` ``overrides`` still apply.

    Raises:
        FileNotFoundError: the run holds neither config (the message says what to run).
        ConfigError: a bad override (naming it).
    """
    from xai_lib.config import Stage1Config, Stage2Config, notebook_config

    run_dir = Path(run_dir)
    for name, schema in (("config_stage2.yaml", Stage2Config), ("config_stage1.yaml", Stage1Config)):
        if (run_dir / name).is_file():
            return notebook_config(run_dir / name, schema, overrides, data_root=data_root).data
    raise FileNotFoundError(
        f"{run_dir} holds neither config_stage2.yaml nor config_stage1.yaml: Stage 3 explains the data of a "
        "trained run. Run notebooks 01 and 02 (or the pipeline's --stage1 --stage2) into this run directory first."
    )


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
) -> dict[str, Any]:
    """Attribute ``items`` with every method, measure, and save figures under ``run_dir/figures``.

    Returns:
        The ``metrics.json["stage3"]`` values: ``{"methods": {NAME: {STAGE3_KEYS...}},
        "num_utterances", "figures"}``.
    """
    methods = [m for m in methods if m != "importance" or xai is not None]
    fig_dir = Path(run_dir) / "figures"
    results = evaluate_methods(
        detector, xai, list(items), methods=methods, seed=seed, progress=progress, method_kwargs=dict(method_kwargs or {})
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
    return {"methods": table, "num_utterances": len(items), "figures": figures}

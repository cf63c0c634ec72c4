"""Stage 3: explaining the detector — attribution methods, their metrics, the viewer.

Modules:
    methods     -- :class:`Attributor` and :data:`METHOD_REGISTRY`: the learned importance,
                   captum baselines (Integrated Gradients, saliency, occlusion), attention
                   rollout and a random floor, all as one score per detector frame.
    metrics     -- frame-level explanation metrics: deletion/insertion, localisation
                   (frame ROC-AUC, frame EER, pointing game).
    calibration -- the label-free frame threshold (a quantile of bona fide frames) and the
                   metrics of a calibrated answer (false-flag rate, F1, IoU, segment EER).
    evaluation  -- :func:`evaluate_methods` (every method on the same utterances) and the
                   partially spoofed explanation set.
    report      -- :func:`run_stage3`: the method table, figures and ``metrics.json["stage3"]``
                   (notebook 03).
    sanity      -- :func:`run_sanity`: model-parameter randomisation, counterfactual restoration,
                   waveform-domain deletion/insertion.
    viewer      -- :class:`ImportanceViewer`, the ipywidgets viewer.
"""
from xai_lib.explanation.evaluation import evaluate_methods, load_explanation_set, load_utterance_items
from xai_lib.explanation.methods import METHOD_REGISTRY, METHODS, Attributor, FrameAttribution, attribute
from xai_lib.explanation.metrics import deletion_insertion, frame_eer, frame_roc_auc, localization_metrics
from xai_lib.explanation.report import (
    calibrated_table,
    metrics_table,
    run_data_config,
    run_stage3,
    similarity_fn,
    use_run_threads,
    viewer_items,
)
from xai_lib.explanation.viewer import ImportanceViewer

__all__ = [
    "METHODS",
    "METHOD_REGISTRY",
    "Attributor",
    "FrameAttribution",
    "attribute",
    "deletion_insertion",
    "localization_metrics",
    "frame_roc_auc",
    "frame_eer",
    "evaluate_methods",
    "load_explanation_set",
    "load_utterance_items",
    "calibrated_table",
    "run_data_config",
    "run_stage3",
    "use_run_threads",
    "metrics_table",
    "similarity_fn",
    "viewer_items",
    "ImportanceViewer",
]

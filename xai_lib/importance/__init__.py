"""Stage 2: the learned frame importance — an XAI module trained on the frozen detector.

Modules:
    module      -- :class:`XAIModule`: importance network w(t), prototypes, importance-pooled
                   utterance embedding.
    loss        -- :func:`xai_loss`: contrastive, bona fide regularisation, smoothness,
                   sparsity and fidelity terms.
    inference   -- the representation h(t) it reads (:func:`extract_representation`) and
                   :class:`LoadedXAI`, the trained module applied to waveforms.
    checkpoint  -- ``save_xai`` / ``load_xai`` (``stage2_xai.pth``).
    training    -- ``train_stage2`` (finds and freezes the detector) — notebook 02.
    report      -- ``stage2_report``: importance statistics, localisation, figures.
"""
from xai_lib.importance.checkpoint import load_xai, save_xai
from xai_lib.importance.inference import LoadedXAI, extract_representation
from xai_lib.importance.loss import xai_loss
from xai_lib.importance.module import XAIModule, XAIOutput
from xai_lib.importance.report import stage2_report
from xai_lib.importance.training import (
    SMOKE_OVERRIDES,
    NoStage1ModelError,
    Stage2Result,
    load_frozen_detector,
    resolve_detector,
    stage2_config,
    train_stage2,
)

__all__ = [
    "XAIModule",
    "XAIOutput",
    "xai_loss",
    "LoadedXAI",
    "extract_representation",
    "save_xai",
    "load_xai",
    "SMOKE_OVERRIDES",
    "stage2_config",
    "NoStage1ModelError",
    "Stage2Result",
    "resolve_detector",
    "load_frozen_detector",
    "train_stage2",
    "stage2_report",
]

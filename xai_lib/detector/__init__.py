"""Stage 1: the detector — an SSL front end (wav2vec 2.0 / XLS-R) and a back end:
Conformer-TCM (``model.backend: tcm``, the default) or AASIST (``model.backend: aasist``).

Modules:
    model       -- :class:`Detector` (``forward(wave, lengths)``, ``frontend``, ``backend``),
                   :func:`build_detector`, the TCM back end with the published parameter names.
    aasist      -- the SSL-AASIST back end (``AASISTDetector``) with the recipe's parameter names.
    checkpoint  -- ``save_detector`` / ``load_detector`` (our format and the published TCM and
                   SSL-AASIST state dicts with fairseq names), strict and code-free.
    training    -- ``train_stage1``, ``score_utterances``, ``stage1_report`` (notebook 01).
    metrics     -- utterance-level detection metrics: ASVspoof EER, min t-DCF, per-attack
                   EER, DET curves and score files.
"""
from xai_lib.detector.checkpoint import LoadReport, average_state_dicts, load_detector, save_detector
from xai_lib.detector.metrics import compute_det_curve, compute_min_tdcf, eer_per_attack, utterance_eer
from xai_lib.detector.aasist import AASISTDetector
from xai_lib.detector.model import Detector, DetectorOutput, PretrainedNotFoundError, TCMDetector, build_detector, build_ssl
from xai_lib.detector.training import SMOKE_OVERRIDES, Stage1Result, stage1_config, evaluate_detector, score_utterances, stage1_report, train_stage1

__all__ = [
    "Detector",
    "TCMDetector",
    "AASISTDetector",
    "build_detector",
    "DetectorOutput",
    "PretrainedNotFoundError",
    "build_ssl",
    "LoadReport",
    "load_detector",
    "save_detector",
    "average_state_dicts",
    "SMOKE_OVERRIDES",
    "stage1_config",
    "Stage1Result",
    "train_stage1",
    "evaluate_detector",
    "score_utterances",
    "stage1_report",
    "utterance_eer",
    "compute_det_curve",
    "compute_min_tdcf",
    "eer_per_attack",
]

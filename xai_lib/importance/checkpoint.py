"""Saving and loading trained Stage-2 XAI modules.

A Stage-2 checkpoint (``run_dir/stage2_xai.pth``) holds tensors and primitives only, so it
loads with ``torch.load(weights_only=True)``::

    {"format": "xai_lib.stage2", "version": 1,
     "xai_config": {...XAIConfig fields...}, "in_dim": 1024, "representation": "ssl",
     "state_dict": {...XAIModule tensors...},
     "detector": {"path": ".../stage1_detector.pth", "sha256": "..."},
     "extra": {...best epoch, losses, timing...}}

:func:`load_xai` rebuilds the module and returns a :class:`LoadedXAI`, which explains a
batch of waveforms through the frozen detector it was trained on::

    xai = load_xai(run_dir / "stage2_xai.pth", detector=detector)
    w = xai.frame_importance(detector, wave, lengths)        # (B, T) in [0, 1]
    sims = xai.frame_similarities(detector, wave, lengths)   # (B, T, 2): [spoof, bona fide]
    score = xai.utterance_scores(detector, wave, lengths)    # (B,) higher = more bona fide

``frame_importance`` is the protocol :class:`xai_lib.explanation.methods.Attributor` uses for its
``importance`` method. The representation ``h(t)`` the module reads is recomputed from
the waveform by :func:`extract_representation` (SSL output or back-end frame tokens, one
20 ms frame each, the detector's own frame count).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from xai_lib.config import ConfigError, XAIConfig, config_from_dict, config_to_dict
from xai_lib.files import CheckpointError, atomic_torch_save, safe_torch_load, to_primitive, unwrap_model

from xai_lib.detector.removal import BonafideReference
from xai_lib.importance.inference import LoadedXAI
from xai_lib.importance.module import XAIModule

__all__ = ["STAGE2_FORMAT", "STAGE2_VERSION", "save_xai", "load_xai"]

logger = logging.getLogger(__name__)

STAGE2_FORMAT = "xai_lib.stage2"
STAGE2_VERSION = 1


# ----------------------------------------------------------------------------- save


def save_xai(
    module: nn.Module,
    path: str | Path,
    cfg: XAIConfig,
    detector_path: str | Path,
    detector_sha256: str,
    extra: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    removal_reference: BonafideReference | None = None,
) -> Path:
    """Write a Stage-2 checkpoint atomically (tensors and primitives only).

    Args:
        module: the trained :class:`~xai_lib.importance.module.XAIModule` (a DDP wrapper is unwrapped).
        path: destination, e.g. ``run_dir / "stage2_xai.pth"``.
        cfg: the XAI config it was built and trained with (``representation`` included).
        detector_path: the frozen Stage-1 detector it explains.
        detector_sha256: that file's SHA-256 (checked, with a warning, at load time).
        extra: primitives to keep (best epoch, losses, timing); returned as ``LoadedXAI.extra``.
        calibration: the label-free frame threshold (``LoadedXAI.calibration``).
        removal_reference: the bona fide removal reference (``LoadedXAI.removal_reference``).

    Returns:
        ``path`` as a ``Path``.
    """
    module = unwrap_model(module)
    if not isinstance(module, XAIModule):
        raise TypeError(f"save_xai expects an XAIModule, got {type(module).__name__}")
    obj = {
        "format": STAGE2_FORMAT,
        "version": STAGE2_VERSION,
        "xai_config": config_to_dict(cfg),
        "in_dim": int(module.in_dim),
        "representation": str(cfg.representation),
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()},
        "detector": {"path": str(detector_path), "sha256": str(detector_sha256)},
        "extra": to_primitive(dict(extra or {}), "extra", "save_xai"),
    }
    if calibration is not None:
        obj["calibration"] = to_primitive(dict(calibration), "calibration", "save_xai")
    if removal_reference is not None:
        obj["removal_reference"] = removal_reference.to_state()
    path = atomic_torch_save(obj, path)
    logger.info("saved Stage-2 XAI module to %s", path)
    return path


# ----------------------------------------------------------------------------- load


def load_xai(path: str | Path, detector: nn.Module | None = None, map_location: Any = "cpu") -> LoadedXAI:
    """Load a Stage-2 checkpoint written by :func:`save_xai` (``weights_only=True``).

    Args:
        path: the checkpoint, e.g. ``run_dir / "stage2_xai.pth"``.
        detector: optional frozen detector to check against (representation size must match;
            a SHA-256 different from the recorded one is logged as a warning).
        map_location: passed to ``torch.load``.

    Returns:
        :class:`LoadedXAI` with the module in ``eval()`` and its parameters frozen.

    Raises:
        CheckpointError: missing/unsafe/unreadable file, not a Stage-2 checkpoint, a newer
            format version, tensors that do not fit the recorded architecture, or a detector
            whose representation size differs.
    """
    path = Path(path)
    obj = safe_torch_load(path, map_location)
    if not isinstance(obj, Mapping) or obj.get("format") != STAGE2_FORMAT:
        found = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
        hint = (" It looks like a Stage-1 detector; pass the Stage-2 file (run_dir/stage2_xai.pth)."
                if found == "xai_lib.stage1" or (isinstance(obj, Mapping) and "LL.weight" in obj) else "")
        raise CheckpointError(f"{path}: not a Stage-2 XAI checkpoint (format {found!r}, expected {STAGE2_FORMAT!r}).{hint}")
    version = obj.get("version")
    if not isinstance(version, int) or version > STAGE2_VERSION:
        raise CheckpointError(f"{path}: Stage-2 checkpoint version {version!r} is newer than this xai_lib reads "
                              f"({STAGE2_VERSION}); update xai_lib")
    missing = [k for k in ("xai_config", "in_dim", "representation", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: incomplete Stage-2 checkpoint, missing {', '.join(missing)}")
    try:
        cfg = config_from_dict(obj["xai_config"], XAIConfig, f"{path}:xai_config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    representation = str(obj["representation"])
    if representation != cfg.representation:
        raise CheckpointError(f"{path}: representation {representation!r} disagrees with its xai_config "
                              f"({cfg.representation!r}); the file is inconsistent")
    in_dim = int(obj["in_dim"])
    module = XAIModule(in_dim, cfg)
    try:
        module.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the stored tensors do not fit an XAIModule(in_dim={in_dim}) built from "
                              f"its xai_config: {exc}") from None
    module.eval()
    module.requires_grad_(False)
    loaded = LoadedXAI(
        module=module,
        config=cfg,
        representation=representation,
        in_dim=in_dim,
        detector_info={str(k): str(v) for k, v in dict(obj.get("detector") or {}).items()},
        path=path,
        extra=dict(obj.get("extra") or {}),
        calibration=dict(obj["calibration"]) if obj.get("calibration") else None,
        removal_reference=BonafideReference.from_state(obj["removal_reference"]) if obj.get("removal_reference") else None,
    )
    if detector is not None:
        loaded.check_detector(detector)
    logger.info("loaded Stage-2 XAI module %s (%s representation, dim %d, %s prototypes)",
                path, representation, in_dim, cfg.prototype_mode)
    return loaded

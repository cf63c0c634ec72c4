"""Saving and loading trained Stage-2 XAI modules (DESIGN §4, §7).

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

``frame_importance`` is the protocol :class:`xai_lib.attribution.Attributor` uses for its
``importance`` method. The representation ``h(t)`` the module reads is recomputed from
the waveform by :func:`extract_representation` (SSL output or back-end frame tokens, one
20 ms frame each, the detector's own frame count).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from xai_lib.config import ConfigError, XAIConfig, config_from_dict, config_to_dict
from xai_lib.models.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load, to_primitive, unwrap_model
from xai_lib.models.xai import XAIModule, XAIOutput

__all__ = [
    "STAGE2_FORMAT",
    "STAGE2_VERSION",
    "REPRESENTATIONS",
    "LoadedXAI",
    "extract_representation",
    "representation_dim",
    "file_sha256",
    "detector_source",
    "save_xai",
    "load_xai",
]

logger = logging.getLogger(__name__)

STAGE2_FORMAT = "xai_lib.stage2"
STAGE2_VERSION = 1
REPRESENTATIONS = ("ssl", "backend")


# ----------------------------------------------------------------------------- representation


def _check_kind(kind: str) -> None:
    if kind not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {kind!r}")


def representation_dim(detector: nn.Module, kind: str) -> int:
    """Size ``D`` of the detector's frame representation of ``kind``.

    Args:
        detector: a Stage-1 :class:`~xai_lib.models.detector.Detector`.
        kind: ``"ssl"`` (SSL front-end output, ``D = ssl_dim``) or ``"backend"`` (the last
            Conformer block's frame tokens, ``D = emb_size``).
    """
    _check_kind(kind)
    return int(detector.ssl_dim if kind == "ssl" else detector.emb_size)


@torch.no_grad()
def extract_representation(
    detector: nn.Module,
    wave: Tensor,
    lengths: Tensor | None,
    kind: str,
    context_s: float | None = None,
    full_features: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Frame representation ``h`` of a waveform batch by the frozen detector (no gradient).

    Args:
        detector: the frozen Stage-1 detector (used as it is: call ``eval()`` on it first).
        wave: (B, L) float waveform at 16 kHz, right-padded.
        lengths: (B,) valid samples; ``None`` = all ``L``.
        kind: ``"ssl"``: ``h`` is the SSL output; ``"backend"``: ``h`` is the back end's frame
            tokens (last Conformer block, class token removed), computed from the same SSL
            features.
        context_s: ``None``: ``h`` is computed from the whole utterance, as the detector scores
            it; seconds: from windows of that much audio
            (:meth:`~xai_lib.models.detector.Detector.windowed_frontend`), so that a frame's
            representation reflects its own neighbourhood.
        full_features: also compute the detector's own full-context SSL features (the second
            return value) when ``context_s`` is set; ``False`` returns the windowed ones there.

    Returns:
        h: (B, T, D) the representation (0 on padded frames).
        ssl_features: (B, T, D_ssl) the detector's full-context SSL features, the back end's
            input (what the fidelity term and the deletion metrics perturb frame by frame; the
            same frame index as ``h``).
        frame_mask: (B, T) bool, True on valid frames.
    """
    _check_kind(kind)
    if context_s is None:
        ssl_features, frame_mask = detector.frontend(wave, lengths)  # (B, T, D_ssl), (B, T)
        local = ssl_features
    else:
        local, frame_mask = detector.windowed_frontend(wave, lengths, context_s)
        ssl_features = detector.frontend(wave, lengths)[0] if full_features else local
    if kind == "ssl":
        return local, ssl_features, frame_mask
    tokens = detector.backend(local, frame_mask).frame_tokens  # (B, T, E)
    return tokens, ssl_features, frame_mask


# ----------------------------------------------------------------------------- hashing


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks; large XLS-R checkpoints take seconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def detector_source(detector: nn.Module) -> Path | None:
    """The file a detector was loaded from (``load_detector`` records it), else None."""
    report = getattr(detector, "load_report", None)
    path = getattr(report, "path", None)
    return Path(path) if path else None


# ----------------------------------------------------------------------------- save


def save_xai(
    module: nn.Module,
    path: str | Path,
    cfg: XAIConfig,
    detector_path: str | Path,
    detector_sha256: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a Stage-2 checkpoint atomically (tensors and primitives only).

    Args:
        module: the trained :class:`~xai_lib.models.xai.XAIModule` (a DDP wrapper is unwrapped).
        path: destination, e.g. ``run_dir / "stage2_xai.pth"``.
        cfg: the XAI config it was built and trained with (``representation`` included).
        detector_path: the frozen Stage-1 detector it explains.
        detector_sha256: that file's SHA-256 (checked, with a warning, at load time).
        extra: primitives to keep (best epoch, losses, timing); returned as ``LoadedXAI.extra``.

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
    path = atomic_torch_save(obj, path)
    logger.info("saved Stage-2 XAI module to %s", path)
    return path


# ----------------------------------------------------------------------------- load


@dataclass
class LoadedXAI:
    """A trained Stage-2 module with what is needed to apply it to waveforms.

    Attributes:
        module: the :class:`~xai_lib.models.xai.XAIModule`, in ``eval()``, frozen.
        config: the :class:`~xai_lib.config.XAIConfig` it was trained with.
        representation: ``"ssl"`` or ``"backend"`` (which detector frames ``h`` it reads).
        in_dim: ``D``, the representation size it expects.
        detector_info: ``{"path", "sha256"}`` of the detector it was trained on.
        path: the checkpoint file.
        extra: what training recorded (best epoch, losses, timing).
    """

    module: XAIModule
    config: XAIConfig
    representation: str
    in_dim: int
    detector_info: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -------------------------------------------------------------- checks

    def check_detector(self, detector: nn.Module) -> None:
        """Check that ``detector`` fits this module.

        Raises:
            CheckpointError: the detector's representation size differs from ``in_dim``
                (the message names both sizes and the detector the module was trained on).

        A detector loaded from a file whose SHA-256 differs from the recorded one only logs a
        warning (explanations of another detector are usually meaningless, but a copied or
        re-saved file is legitimate).
        """
        dim = representation_dim(detector, self.representation)
        if dim != self.in_dim:
            raise CheckpointError(
                f"{self.path}: the XAI module reads {self.representation!r} representations of dim "
                f"{self.in_dim}, but the given detector's {self.representation!r} representation has dim {dim}. "
                f"Use the Stage-1 detector it was trained on ({self.detector_info.get('path', 'unknown')}) "
                "or retrain Stage 2 on this detector."
            )
        source = detector_source(detector)
        recorded = self.detector_info.get("sha256")
        if source is not None and recorded and source.is_file():
            actual = file_sha256(source)
            if actual != recorded:
                logger.warning(
                    "the detector %s (sha256 %s...) is not the one the XAI module %s was trained on "
                    "(%s, sha256 %s...); its explanations may not describe this detector",
                    source, actual[:12], self.path, self.detector_info.get("path"), recorded[:12],
                )

    # -------------------------------------------------------------- application

    @torch.no_grad()
    def explain(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None) -> XAIOutput:
        """The module's full output for a waveform batch.

        Args:
            detector: the frozen detector (kept as it is; put it in ``eval()`` yourself).
            wave: (B, L) waveform at 16 kHz, right-padded.
            lengths: (B,) valid samples; ``None`` = all ``L``.

        Returns:
            :class:`~xai_lib.models.xai.XAIOutput` with ``T`` = the detector's frame count.
        """
        h, _, frame_mask = extract_representation(detector, wave, lengths, self.representation,
                                                  context_s=self.config.context_s, full_features=False)
        if h.shape[-1] != self.in_dim:
            self.check_detector(detector)  # raises the explanatory error
        self.module.eval()
        if next(self.module.parameters()).device != h.device:
            self.module.to(h.device)
        return self.module(h.to(next(self.module.parameters()).dtype), frame_mask)

    def frame_importance(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Importance ``w(t)`` in [0, 1] of every detector frame: (B, T), 0 on padded frames.

        The protocol :class:`xai_lib.attribution.Attributor` uses for method ``importance``.
        """
        return self.explain(detector, wave, lengths).importance

    def frame_similarities(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Cosine similarity of every frame to ``[p_spoof, p_bona]``: (B, T, 2), 0 on padding."""
        return self.explain(detector, wave, lengths).similarities

    def utterance_scores(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B,) utterance score of the importance-pooled embedding: bona fide minus spoof logit."""
        return self.explain(detector, wave, lengths).utterance_score


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
    )
    if detector is not None:
        loaded.check_detector(detector)
    logger.info("loaded Stage-2 XAI module %s (%s representation, dim %d, %s prototypes)",
                path, representation, in_dim, cfg.prototype_mode)
    return loaded

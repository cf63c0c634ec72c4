"""Applying a trained Stage-2 module to waveforms: the representation it reads and :class:`LoadedXAI`.

``h(t)`` is recomputed from the waveform by :func:`extract_representation` (SSL output or
back-end frame tokens, one 20 ms frame each, the detector's own frame count), from the
whole utterance or from local windows of audio (``xai.context_s``)::

    xai = load_xai(run_dir / "stage2_xai.pth", detector=detector)
    w = xai.frame_importance(detector, wave, lengths)        # (B, T) in [0, 1]
    sims = xai.frame_similarities(detector, wave, lengths)   # (B, T, 2): [spoof, bona fide]
    score = xai.utterance_scores(detector, wave, lengths)    # (B,) higher = more bona fide

``frame_importance`` is the protocol :class:`xai_lib.explanation.methods.Attributor` uses
for its ``importance`` method.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import torch
from torch import Tensor, nn

from xai_lib.config import XAIConfig
from xai_lib.detector.removal import BonafideReference
from xai_lib.files import CheckpointError, file_sha256
from xai_lib.importance.module import XAIModule, XAIOutput

__all__ = [
    "REPRESENTATIONS",
    "LoadedXAI",
    "extract_representation",
    "context_options",
    "representation_dim",
    "detector_source",
    "importance_per_utterance",
]

logger = logging.getLogger(__name__)

REPRESENTATIONS = ("ssl", "backend")


# ----------------------------------------------------------------------------- representation


def detector_source(detector: nn.Module) -> Path | None:
    """The file a detector was loaded from (``load_detector`` records it), else None."""
    report = getattr(detector, "load_report", None)
    path = getattr(report, "path", None)
    return Path(path) if path else None



def _check_kind(kind: str) -> None:
    if kind not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {kind!r}")


def representation_dim(detector: nn.Module, kind: str) -> int:
    """Size ``D`` of the detector's frame representation of ``kind``.

    Args:
        detector: a Stage-1 :class:`~xai_lib.detector.model.Detector`.
        kind: ``"ssl"`` (SSL front-end output, ``D = ssl_dim``) or ``"backend"`` (the back
            end's frame tokens, ``D = frame_token_dim``: TCM, the last Conformer block's frame
            outputs, ``emb_size``; AASIST, the temporal node features of each 3-frame step,
            ``model.aasist.encoder_channels[-1]``).
    """
    _check_kind(kind)
    if kind == "ssl":
        return int(detector.ssl_dim)
    return int(getattr(detector, "frame_token_dim", None) or detector.emb_size)


def context_options(xai_cfg: Any) -> dict[str, Any]:
    """The local-context keyword arguments of :func:`extract_representation` from an
    :class:`~xai_lib.config.XAIConfig` (``context_s``, ``context_mode``, ``group_norm``)."""
    return {"context_s": xai_cfg.context_s, "context_mode": xai_cfg.context_mode,
            "group_norm": getattr(xai_cfg, "context_group_norm", "centred")}


@torch.no_grad()
def extract_representation(
    detector: nn.Module,
    wave: Tensor,
    lengths: Tensor | None,
    kind: str,
    context_s: float | None = None,
    full_features: bool = True,
    context_mode: str = "windows",
    group_norm: str = "centred",
) -> tuple[Tensor, Tensor, Tensor]:
    """Frame representation ``h`` of a waveform batch by the frozen detector (no gradient).

    Args:
        detector: the frozen Stage-1 detector (used as it is: call ``eval()`` on it first).
        wave: (B, L) float waveform at 16 kHz, right-padded.
        lengths: (B,) valid samples; ``None`` = all ``L``.
        kind: ``"ssl"``: ``h`` is the SSL output; ``"backend"``: ``h`` is the back end's frame
            tokens (TCM: the last Conformer block, class token removed; AASIST: the temporal node
            features, each 3-frame step repeated over its frames, 0 on the last ``T % 3`` frames
            the back end never sees), computed from the same SSL features.
        context_s: ``None``: ``h`` is computed from the whole utterance, as the detector scores
            it; seconds: from windows of that much audio
            (:meth:`~xai_lib.detector.model.Detector.windowed_frontend`), so that a frame's
            representation reflects its own neighbourhood.
        full_features: also compute the detector's own full-context SSL features (the second
            return value) when ``context_s`` is set; ``False`` returns the windowed ones there.
            Both come from :meth:`~xai_lib.detector.model.Detector.frontend_with_context`, which
            shares the conv feature encoder between them where that changes nothing.
        context_mode, group_norm: how the windows are computed (``xai.context_mode``,
            ``xai.context_group_norm``).

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
    elif full_features:
        ssl_features, local, frame_mask = detector.frontend_with_context(wave, lengths, context_s, context_mode,
                                                                         group_norm)
    else:
        local, frame_mask = detector.windowed_frontend(wave, lengths, context_s, mode=context_mode,
                                                       group_norm=group_norm)
        ssl_features = local
    if kind == "ssl":
        return local, ssl_features, frame_mask
    tokens = detector.backend(local, frame_mask).frame_tokens  # (B, T, E)
    return tokens, ssl_features, frame_mask


@dataclass
class LoadedXAI:
    """A trained Stage-2 module with what is needed to apply it to waveforms.

    Attributes:
        module: the :class:`~xai_lib.importance.module.XAIModule`, in ``eval()``, frozen.
        config: the :class:`~xai_lib.config.XAIConfig` it was trained with.
        representation: ``"ssl"`` or ``"backend"`` (which detector frames ``h`` it reads).
        in_dim: ``D``, the representation size it expects.
        detector_info: ``{"path", "sha256"}`` of the detector it was trained on.
        path: the checkpoint file.
        extra: what training recorded (best epoch, losses, timing).
        calibration: the label-free frame threshold: ``{"threshold", "false_flag_rate",
            "bonafide_quantiles", ...}`` (:func:`xai_lib.explanation.calibration.calibration_record`
            over the bona fide dev utterances); ``None`` for a checkpoint written before it existed.
        removal_reference: the bona fide frames that replace removed ones (``xai.removal: bonafide``).
    """

    module: XAIModule
    config: XAIConfig
    representation: str
    in_dim: int
    detector_info: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    removal_reference: BonafideReference | None = None

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
            :class:`~xai_lib.importance.module.XAIOutput` with ``T`` = the detector's frame count.
        """
        h, _, frame_mask = extract_representation(detector, wave, lengths, self.representation,
                                                  full_features=False, **context_options(self.config))
        if h.shape[-1] != self.in_dim:
            self.check_detector(detector)  # raises the explanatory error
        self.module.eval()
        if next(self.module.parameters()).device != h.device:
            self.module.to(h.device)
        return self.module(h.to(next(self.module.parameters()).dtype), frame_mask)

    def frame_importance(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Importance ``w(t)`` in [0, 1] of every detector frame: (B, T), 0 on padded frames.

        The protocol :class:`xai_lib.explanation.methods.Attributor` uses for method ``importance``.
        """
        return self.explain(detector, wave, lengths).importance

    def frame_similarities(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Cosine similarity of every frame to ``[p_spoof, p_bona]``: (B, T, 2), 0 on padding."""
        return self.explain(detector, wave, lengths).similarities

    def utterance_scores(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B,) utterance score of the importance-pooled embedding: bona fide minus spoof logit."""
        return self.explain(detector, wave, lengths).utterance_score


@torch.no_grad()
def importance_per_utterance(
    xai: LoadedXAI, detector: nn.Module, waves: Sequence[np.ndarray | Tensor], batch_size: int = 16
) -> list[np.ndarray]:
    """``w(t)`` of every wave, one ``(T_i,)`` array each (batched by length, padding removed)."""
    from xai_lib.data.audio import pad_batch

    device = next(detector.parameters()).device
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
    out: list[np.ndarray | None] = [None] * len(waves)
    for k in range(0, len(order), batch_size):
        rows = order[k: k + batch_size]
        wave, lengths = pad_batch([waves[i] for i in rows])
        res = xai.explain(detector, wave.to(device), lengths.to(device))
        for j, i in enumerate(rows):
            out[i] = res.importance[j][res.frame_mask[j]].float().cpu().numpy()
    return out  # type: ignore[return-value]

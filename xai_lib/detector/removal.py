"""Removing frames from the detector's representation without leaving its distribution.

Faithfulness needs a way to "remove" a frame. Zeroing it asks a different question of every
detector (what does this detector make of silence-free zeros?). Here a removed frame is
replaced by the same-index frame of a **bona fide reference**: the SSL features of a bona
fide training utterance the detector itself scores like typical bona fide speech. Removing
every frame therefore gives a real bona fide utterance, which the detector scores as such
by construction, and every frame it sees is a real frame::

    reference = BonafideReference.from_utterances(detector, waves)       # K references
    mixed = reference.remove(ssl_features, keep)    # keep (B, T) in [0, 1]: 1 = keep the frame
    p_spoof = detector.backend(mixed, frame_mask).logits.softmax(-1)[:, 0]

Utterance ``b`` of a batch uses reference ``(offset + b) % K``, tiled (repeated) when it is
shorter than the utterance.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["BonafideReference", "SPOOF_COLUMN"]

log = logging.getLogger(__name__)

SPOOF_COLUMN = 0  # logits column of the spoof class


@dataclass
class BonafideReference:
    """SSL features of K bona fide reference utterances.

    Attributes:
        features: (K, T_r, D) SSL features (0 after each reference's length).
        lengths: (K,) valid frames of each reference.
        p_spoof: (K,) the detector's spoof probability of each reference.
    """

    features: Tensor
    lengths: Tensor
    p_spoof: Tensor

    @classmethod
    @torch.no_grad()
    def from_utterances(
        cls, detector: nn.Module, waves: Sequence[np.ndarray | Tensor], k: int = 8
    ) -> BonafideReference:
        """The ``k`` references the detector scores most like typical bona fide speech.

        Each candidate wave is scored whole; among those the detector calls bona fide
        (p_spoof < 0.5; all of them if none is), the ``k`` whose spoof probability is closest
        to the median of the candidates are kept, in candidate order.

        Args:
            detector: the frozen detector (eval mode).
            waves: candidate bona fide waveforms (L_i,) at 16 kHz, e.g. 4k training utterances.
            k: references kept.

        Raises:
            ValueError: no candidate.
        """
        if not waves:
            raise ValueError("BonafideReference needs at least one bona fide utterance")
        device = next(detector.parameters()).device
        feats, p = [], []
        for wave in waves:
            x = torch.as_tensor(np.asarray(wave, dtype=np.float32))[None].to(device)  # (1, L)
            ssl, mask = detector.frontend(x)  # (1, T, D)
            logits = detector.backend(ssl, mask).logits
            feats.append(ssl[0].float().cpu())
            p.append(float(logits.float().softmax(-1)[0, SPOOF_COLUMN]))
        p_arr = np.asarray(p)
        pool = np.flatnonzero(p_arr < 0.5)
        if pool.size == 0:
            log.warning("the detector calls none of the %d bona fide reference candidates bona fide; using all", len(p))
            pool = np.arange(len(p))
        median = float(np.median(p_arr[pool]))
        chosen = sorted(pool[np.argsort(np.abs(p_arr[pool] - median), kind="stable")[:k]].tolist())
        lengths = torch.tensor([feats[i].shape[0] for i in chosen], dtype=torch.long)
        out = torch.zeros(len(chosen), int(lengths.max()), feats[0].shape[1])
        for j, i in enumerate(chosen):
            out[j, : feats[i].shape[0]] = feats[i]
        log.info("bona fide removal reference: %d of %d candidates, p_spoof %s", len(chosen), len(p),
                 ", ".join(f"{p_arr[i]:.3f}" for i in chosen))
        return cls(features=out, lengths=lengths, p_spoof=torch.tensor(p_arr[chosen], dtype=torch.float32))

    def fill(self, batch: int, frames: int, offset: int = 0, like: Tensor | None = None) -> Tensor:
        """(batch, frames, D): reference ``(offset + b) % K`` for row ``b``, tiled to ``frames``."""
        rows = []
        for b in range(batch):
            k = (offset + b) % self.features.shape[0]
            ref = self.features[k, : int(self.lengths[k])]  # (T_k, D)
            reps = -(-frames // ref.shape[0])
            rows.append(ref.repeat(reps, 1)[:frames])
        out = torch.stack(rows)
        return out.to(like.device, like.dtype) if like is not None else out

    def remove(self, ssl_features: Tensor, keep: Tensor, offset: int = 0) -> Tensor:
        """``keep * ssl_features + (1 - keep) * reference``, frame by frame.

        Args:
            ssl_features: (B, T, D).
            keep: (B, T) in [0, 1] (1 = the frame stays, 0 = removed); differentiable.
            offset: which reference the first row uses.

        Returns:
            (B, T, D).
        """
        ref = self.fill(ssl_features.shape[0], ssl_features.shape[1], offset, like=ssl_features)
        k = keep.to(ssl_features.dtype)[..., None]
        return k * ssl_features + (1.0 - k) * ref

    def to_state(self) -> dict[str, Tensor]:
        """Tensors for a checkpoint (``weights_only`` loadable)."""
        return {"features": self.features.contiguous(), "lengths": self.lengths, "p_spoof": self.p_spoof}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> BonafideReference:
        return cls(features=state["features"], lengths=state["lengths"], p_spoof=state["p_spoof"])

"""The Stage-2 XAI module: a per-frame importance network and two class prototypes.

The module works on frame representations ``h`` of the *frozen* detector (SSL output or
back-end frame tokens), never on audio, so it is a pure torch module::

    xai = XAIModule(in_dim=h.shape[-1], cfg=XAIConfig())
    out = xai(h, frame_mask)            # h: (B, T, D), frame_mask: (B, T) True = real frame
    out.importance                      # (B, T)    w(t) in [0, 1], 0 on padded frames
    out.similarities                    # (B, T, 2) cosine to [p_spoof, p_bona]
    out.utterance_logits                # (B, 2)    [spoof, bona fide] / temperature

**Class index order** (everywhere in this module and in :mod:`xai_lib.importance.loss`):
index 0 = spoof, index 1 = bona fide, matching the detector's logits (column 1 = bona fide)
and the label convention ``1 = bona fide, 0 = spoof``; a label is therefore directly the
column index of its class.

Prototype modes (:class:`Prototypes`):

* ``ema`` -- buffers, changed only by an explicit :meth:`Prototypes.update` call on
  *training* batches while the module is in training mode (a call in eval mode is a
  documented no-op, so dev/eval data can never leak into them); each class is initialised
  from the first batch that contains it, then ``p <- m * p + (1 - m) * batch_mean``.
* ``fixed`` -- buffers set once before training by :meth:`Prototypes.set_from_class_means`
  (use :func:`class_means` over the training set); never updated, never trained.
* ``learnable`` -- an ``nn.Parameter`` trained by the loss.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from xai_lib.config import XAIConfig

__all__ = [
    "SPOOF_INDEX",
    "BONAFIDE_INDEX",
    "ImportanceNetwork",
    "Prototypes",
    "XAIModule",
    "XAIOutput",
    "class_means",
    "normalized_importance",
]

logger = logging.getLogger(__name__)

SPOOF_INDEX = 0  # column of p_spoof in the prototypes / similarities / logits
BONAFIDE_INDEX = 1  # column of p_bona (label 1 = bona fide)

NORMALIZE_EPS = 1e-6  # added to every w(t) before normalising: all-zero w -> uniform weights


def _as_mask(frame_mask: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """A float (B, T) mask (1 = real frame); all ones when ``frame_mask`` is None."""
    if frame_mask is None:
        return h.new_ones(h.shape[:2])
    if frame_mask.shape != h.shape[:2]:
        raise ValueError(f"frame_mask has shape {tuple(frame_mask.shape)}, expected (B, T) = {tuple(h.shape[:2])}")
    return frame_mask.to(dtype=h.dtype)


def normalized_importance(
    importance: torch.Tensor, frame_mask: torch.Tensor | None = None, eps: float = NORMALIZE_EPS
) -> torch.Tensor:
    """Importance normalised to a distribution over each utterance's valid frames.

    ``a(t) = m(t) (w(t) + eps) / sum_s m(s) (w(s) + eps)``. Multiplying ``w`` by any constant
    leaves ``a`` (almost) unchanged, and an all-zero or constant ``w`` gives the uniform
    average, so a loss built on ``a`` cannot be lowered by shrinking ``w``.

    Args:
        importance: ``w``, (B, T) in [0, 1].
        frame_mask: (B, T), True/1 for real frames; None = all real.
        eps: added to every ``w(t)``; keeps ``a`` defined (uniform) when ``w`` is all zero.

    Returns:
        ``a``: (B, T), non-negative, summing to 1 over valid frames (all 0 for an utterance
        with no valid frame).
    """
    mask = _as_mask(frame_mask, importance.unsqueeze(-1))
    weights = (importance + eps) * mask  # (B, T)
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


# ----------------------------------------------------------------------------- importance


def smoothing_frames(seconds: float, frame_hop_s: float = 0.02) -> int:
    """Odd number of 20 ms frames spanning about ``seconds`` (1 = no smoothing)."""
    k = int(round(seconds / frame_hop_s))
    return max(1, k + 1 if k % 2 == 0 else k) if k > 1 else 1


class ImportanceNetwork(nn.Module):
    """Per-frame importance ``w(t) = sigmoid(f(h(t)))`` in [0, 1].

    ``arch="mlp"``: ``Linear(D, H) -> LayerNorm -> ReLU -> Dropout -> Linear(H, H/2) ->
    LayerNorm -> ReLU -> Dropout -> Linear(H/2, 1) -> sigmoid``, applied to each frame alone.
    ``arch="conv"``: the same, but the first layer is a temporal ``Conv1d(D, H, kernel 5,
    same padding)``; padded frames are zeroed before the convolution, so a padded batch gives
    the same ``w`` on real frames as each utterance alone.

    Args:
        in_dim: ``D``, the representation size.
        hidden_dim: ``H`` (256 in the seed); the second hidden layer has ``H // 2``.
        dropout: dropout after each hidden layer (training mode only).
        arch: ``"mlp"`` or ``"conv"``.
        conv_kernel: kernel size of the ``conv`` variant's first layer (odd).
        smoothing_frames: ``k`` > 1 averages the sigmoid outputs over ``k`` frames centred on
            each frame (valid frames only; the mean of values in [0, 1] stays in [0, 1]): ``w``
            at the time resolution its representation supports. 1 (or 0) = off, the seed.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        arch: str = "mlp",
        conv_kernel: int = 5,
        smoothing_frames: int = 1,
    ) -> None:
        super().__init__()
        self.smoothing_frames = max(1, int(smoothing_frames))
        if arch not in ("mlp", "conv"):
            raise ValueError(f"ImportanceNetwork arch must be 'mlp' or 'conv', got {arch!r}")
        if conv_kernel % 2 != 1:
            raise ValueError(f"ImportanceNetwork conv_kernel must be odd (same padding), got {conv_kernel}")
        self.arch = arch
        half = max(1, hidden_dim // 2)
        if arch == "conv":
            self.input_layer: nn.Module = nn.Conv1d(in_dim, hidden_dim, conv_kernel, padding=conv_kernel // 2)
        else:
            self.input_layer = nn.Linear(in_dim, hidden_dim)
        self.head = nn.Sequential(
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, half),
            nn.LayerNorm(half),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(half, 1),
        )

    def forward(self, h: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Importance of every frame.

        Args:
            h: (B, T, D) frame representations.
            frame_mask: (B, T), True/1 for real frames; None = all real.

        Returns:
            ``w``: (B, T) in [0, 1]; exactly 0 on padded frames.
        """
        mask = _as_mask(frame_mask, h)  # (B, T)
        if self.arch == "conv":
            x = (h * mask.unsqueeze(-1)).transpose(1, 2)  # (B, D, T), padded frames zeroed
            x = self.input_layer(x).transpose(1, 2)  # (B, T, H)
        else:
            x = self.input_layer(h)  # (B, T, H)
        logits = self.head(x).squeeze(-1)  # (B, T)
        w = torch.sigmoid(logits) * mask
        k = self.smoothing_frames
        if k > 1:  # masked moving average: padded frames neither count nor receive
            kernel = w.new_ones(1, 1, k)
            total = F.conv1d(w.unsqueeze(1), kernel, padding=k // 2)[:, 0, : w.shape[1]]
            count = F.conv1d(mask.unsqueeze(1), kernel, padding=k // 2)[:, 0, : w.shape[1]]
            w = total / count.clamp_min(1.0) * mask
        return w


# ----------------------------------------------------------------------------- prototypes


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over DDP ranks (no-op outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _class_sums(
    h: torch.Tensor, frame_weights: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class weighted frame sums (2, D) and total weights (2,), in float64."""
    hw = h.detach().double() * frame_weights.detach().double().unsqueeze(-1)  # (B, T, D)
    per_utt = hw.sum(dim=1)  # (B, D)
    per_utt_w = frame_weights.detach().double().sum(dim=1)  # (B,)
    onehot = F.one_hot(labels.long(), 2).double()  # (B, 2)
    return onehot.T @ per_utt, onehot.T @ per_utt_w  # (2, D), (2,)


def class_means(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]], progress: bool = True
) -> torch.Tensor:
    """Frame-weighted class means of the representation over a data set (``fixed`` prototypes).

    Every valid frame counts once: ``mean_c = sum of h(t) over valid frames of class-c
    utterances / number of those frames``. Under torch.distributed the sums are reduced over
    ranks, so every rank gets the means of the whole (sharded) training set.

    Args:
        batches: iterable of ``(h (B, T, D), frame_mask (B, T) or None, labels (B,))`` with
            labels 1 = bona fide, 0 = spoof (e.g. the frozen detector's representations of the
            training set).
        progress: show a tqdm progress bar.

    Returns:
        (2, D) float32: row 0 = spoof mean, row 1 = bona fide mean.

    Raises:
        ValueError: the iterable is empty or one class has no valid frame.
    """
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    for h, frame_mask, labels in tqdm(batches, desc="prototype class means", disable=not progress, leave=False):
        mask = _as_mask(frame_mask, h)
        s, c = _class_sums(h, mask, labels.to(h.device))
        sums = s if sums is None else sums + s.to(sums.device)
        counts = c if counts is None else counts + c.to(counts.device)
    if sums is None or counts is None:
        raise ValueError("class_means: got no batches; pass the training set's (h, frame_mask, labels) batches")
    sums, counts = _all_reduce_sum(sums), _all_reduce_sum(counts)
    missing = [name for name, n in zip(("spoof", "bona fide"), counts.tolist()) if n <= 0]
    if missing:
        raise ValueError(
            f"class_means: no valid frames for class {missing[0]}; the training set must contain "
            "both bona fide (label 1) and spoof (label 0) utterances"
        )
    logger.info("prototype class means from %d spoof and %d bona fide frames", int(counts[0]), int(counts[1]))
    return (sums / counts.unsqueeze(-1)).float()


class Prototypes(nn.Module):
    """Two class prototypes in representation space, compared by cosine similarity.

    The tensor ``prototypes`` (2, D) holds row 0 = ``p_spoof`` and row 1 = ``p_bona`` in every
    mode (a buffer for ``ema``/``fixed``, an ``nn.Parameter`` for ``learnable``), so
    checkpoints have the same keys whatever the mode. ``initialized`` (2,) bool buffer says
    which rows were set from data.

    Args:
        dim: ``D``, the representation size.
        mode: ``"ema"``, ``"fixed"`` or ``"learnable"`` (see the module docstring).
        momentum: EMA momentum ``m`` (``ema`` only): ``p <- m p + (1 - m) batch_mean``.
    """

    prototypes: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, dim: int, mode: str = "ema", momentum: float = 0.99) -> None:
        super().__init__()
        if mode not in ("ema", "fixed", "learnable"):
            raise ValueError(f"Prototypes mode must be 'ema', 'fixed' or 'learnable', got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Prototypes momentum must be in [0, 1), got {momentum}")
        self.mode = mode
        self.momentum = momentum
        if mode == "learnable":
            self.prototypes = nn.Parameter(torch.randn(2, dim) * dim**-0.5)
            self.register_buffer("initialized", torch.ones(2, dtype=torch.bool))
        else:
            self.register_buffer("prototypes", torch.zeros(2, dim))
            self.register_buffer("initialized", torch.zeros(2, dtype=torch.bool))

    @property
    def p_spoof(self) -> torch.Tensor:
        """(D,) the spoof prototype (row :data:`SPOOF_INDEX`)."""
        return self.prototypes[SPOOF_INDEX]

    @property
    def p_bona(self) -> torch.Tensor:
        """(D,) the bona fide prototype (row :data:`BONAFIDE_INDEX`)."""
        return self.prototypes[BONAFIDE_INDEX]

    @property
    def is_ready(self) -> bool:
        """True when both prototypes hold data (always for ``learnable``)."""
        return bool(self.initialized.all())

    def similarities(self, h: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each vector to ``[p_spoof, p_bona]``.

        Args:
            h: (..., D), e.g. (B, T, D) frames or (B, D) pooled embeddings.

        Returns:
            (..., 2): ``[..., 0] = cos(h, p_spoof)``, ``[..., 1] = cos(h, p_bona)``; a row that
            is still all zero (an uninitialised ``ema`` prototype) gives similarity 0.
        """
        h_unit = F.normalize(h, dim=-1, eps=1e-8)  # (..., D)
        p_unit = F.normalize(self.prototypes.to(h.dtype), dim=-1, eps=1e-8)  # (2, D)
        return h_unit @ p_unit.T  # (..., 2)

    @torch.no_grad()
    def set_from_class_means(self, means: torch.Tensor) -> None:
        """Set both prototypes from class means (2, D) (row 0 spoof, row 1 bona fide).

        The way to build ``fixed`` prototypes (once, before training, from
        :func:`class_means` over the training set); also allowed as the initial value of
        ``ema`` and ``learnable`` prototypes.
        """
        if means.shape != self.prototypes.shape:
            raise ValueError(
                f"set_from_class_means: expected means of shape {tuple(self.prototypes.shape)} "
                f"(row 0 spoof, row 1 bona fide), got {tuple(means.shape)}"
            )
        self.prototypes.copy_(means.to(self.prototypes))
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(
        self,
        h: torch.Tensor,
        importance: torch.Tensor | None,
        labels: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> bool:
        """EMA update from one *training* batch (``ema`` mode, training mode only).

        Batch class means: bona fide = mean of all valid frames of bona fide utterances;
        spoof = importance-weighted mean ``sum w(t) h(t) / sum w(t)`` over valid frames of spoof
        utterances (the frames the explanation marks as spoof evidence; plain mean when
        ``importance`` is None or sums to 0). A class absent from the batch is left alone; a
        class seen for the first time is set to its batch mean. Inputs are detached.

        It is a **no-op** (returns False) when the module is in eval mode or the mode is not
        ``ema``, so calling it on dev/eval batches cannot change the prototypes.

        Args:
            h: (B, T, D) representations of a training batch.
            importance: (B, T) ``w`` of that batch, or None.
            labels: (B,) 1 = bona fide, 0 = spoof.
            frame_mask: (B, T), True/1 for real frames; None = all real.

        Returns:
            True when the prototypes were updated.
        """
        if self.mode != "ema" or not self.training:
            return False
        mask = _as_mask(frame_mask, h)  # (B, T)
        labels = labels.to(h.device).long()
        weights = mask.clone()
        if importance is not None:
            weighted = importance.detach().to(mask) * mask
            is_spoof = labels == SPOOF_INDEX  # (B,)
            if float(weighted[is_spoof].sum()) > 0:
                weights[is_spoof] = weighted[is_spoof]
        sums, counts = _class_sums(h, weights, labels)
        sums, counts = _all_reduce_sum(sums), _all_reduce_sum(counts)
        present = counts > 0  # (2,)
        if not bool(present.any()):
            return False
        batch_means = (sums / counts.clamp_min(1e-12).unsqueeze(-1)).to(self.prototypes)  # (2, D)
        for c in range(2):
            if not bool(present[c]):
                continue
            if bool(self.initialized[c]):
                self.prototypes[c].mul_(self.momentum).add_(batch_means[c], alpha=1.0 - self.momentum)
            else:
                self.prototypes[c].copy_(batch_means[c])
                self.initialized[c] = True
        return True

    def extra_repr(self) -> str:
        return f"dim={self.prototypes.shape[1]}, mode={self.mode!r}, momentum={self.momentum}"


# ----------------------------------------------------------------------------- module


@dataclass
class XAIOutput:
    """What :class:`XAIModule` returns for a batch of B utterances of T frames.

    Attributes:
        importance: (B, T) ``w(t)`` in [0, 1] at the representation's frame rate (20 ms);
            0 on padded frames. High = evidence of spoofing.
        similarities: (B, T, 2) cosine similarity of ``h(t)`` to ``[p_spoof, p_bona]``
            (index 0 spoof, 1 bona fide); 0 on padded frames.
        pooled: (B, D) importance-pooled embedding ``sum_t a(t) h(t)`` with ``a`` from
            :func:`normalized_importance` (weights sum to 1 over valid frames).
        utterance_logits: (B, 2) ``cos(pooled, [p_spoof, p_bona]) / temperature``
            (column 1 = bona fide, as the detector's logits).
        frame_mask: (B, T) bool, True for real frames (as passed in, or all True).
    """

    importance: torch.Tensor
    similarities: torch.Tensor
    pooled: torch.Tensor
    utterance_logits: torch.Tensor
    frame_mask: torch.Tensor

    @property
    def utterance_score(self) -> torch.Tensor:
        """(B,) bona fide minus spoof logit; higher = more bona fide (ASVspoof convention)."""
        return self.utterance_logits[:, BONAFIDE_INDEX] - self.utterance_logits[:, SPOOF_INDEX]


class XAIModule(nn.Module):
    """Importance network + prototypes on frozen-detector frame representations.

    Args:
        in_dim: ``D``, size of the representation ``h``.
        cfg: the Stage-2 :class:`~xai_lib.config.XAIConfig` (importance architecture, hidden
            size, dropout, prototype mode, EMA momentum, temperature).
    """

    def __init__(self, in_dim: int, cfg: XAIConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or XAIConfig()
        self.in_dim = in_dim
        self.temperature = cfg.temperature
        self.importance = ImportanceNetwork(
            in_dim, hidden_dim=cfg.importance_hidden_dim, dropout=cfg.dropout, arch=cfg.importance_arch,
            smoothing_frames=smoothing_frames(cfg.importance_smoothing_s),
        )
        self.prototypes = Prototypes(in_dim, mode=cfg.prototype_mode, momentum=cfg.ema_momentum)

    def forward(self, h: torch.Tensor, frame_mask: torch.Tensor | None = None) -> XAIOutput:
        """Explain a batch.

        Args:
            h: (B, T, D) frame representations of the frozen detector.
            frame_mask: (B, T), True/1 for real frames; None = all real.

        Returns:
            :class:`XAIOutput`.

        Raises:
            RuntimeError: in eval mode with ``fixed``/``ema`` prototypes that were never set
                (train first, call ``set_from_class_means``, or load a checkpoint).
        """
        if h.dim() != 3 or h.shape[-1] != self.in_dim:
            raise ValueError(f"XAIModule expects h of shape (B, T, {self.in_dim}), got {tuple(h.shape)}")
        if not self.training and not self.prototypes.is_ready:
            raise RuntimeError(
                f"XAIModule: the {self.prototypes.mode!r} prototypes were never set; train the module, "
                "call prototypes.set_from_class_means(class_means(...)), or load a Stage-2 checkpoint"
            )
        mask = _as_mask(frame_mask, h)  # (B, T) float
        w = self.importance(h, mask)  # (B, T)
        sims = self.prototypes.similarities(h) * mask.unsqueeze(-1)  # (B, T, 2)
        a = normalized_importance(w, mask)  # (B, T)
        pooled = torch.einsum("bt,btd->bd", a, h)  # (B, D)
        logits = self.prototypes.similarities(pooled) / self.temperature  # (B, 2)
        return XAIOutput(
            importance=w, similarities=sims, pooled=pooled, utterance_logits=logits, frame_mask=mask > 0
        )

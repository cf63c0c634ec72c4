r"""The Stage-2 objective: the seed's four terms made collapse-proof, plus a fidelity term.

Notation for one utterance with label ``y`` (1 = bona fide, 0 = spoof), valid frames
``t = 1..T`` (``m(t) = 1``), importance ``w(t) in [0, 1]``, cosine similarities
``s_c(t) = cos(h(t), p_c)`` with ``c = 0`` spoof and ``c = 1`` bona fide, temperature ``tau``:

* frame cross-entropy towards the utterance label
  ``l(t) = -log softmax_c(s_c(t) / tau)[y]``;
* normalised importance ``a(t) = (w(t) + eps) / sum_s (w(s) + eps)`` (``eps = 1e-6``):
  invariant to the scale of ``w``; a constant or all-zero ``w`` gives uniform weights.

Terms (each averaged over the utterances it applies to; 0 when there are none):

1. contrastive ``L_c``:
   spoof: ``sum_t a(t) l(t)`` -- the frames ``w`` marks must look spoof; no global scale of
   ``w`` can lower it, only moving ``w`` onto spoof-like frames can.
   bona fide: ``(1/T) sum_t l(t)`` -- the *uniform* average, so this part does not depend on
   ``w`` at all (it only shapes learnable prototypes). Weighting it by ``w`` would reward
   ``w`` on bona-like frames of bona fide utterances, the opposite of what ``w`` means.
2. bona fide regularisation ``L_b = (1/T) sum_t w(t)`` on bona fide utterances
   (on bona fide speech "nothing is spoofed", so ``w -> 0`` is the right answer there).
3. temporal smoothness ``L_t = (1/(T-1)) sum_{t>=2} |w(t) - w(t-1)|`` over pairs of
   consecutive valid frames, on all utterances.
4. sparsity on spoof ``L_s = ((1/T) sum_t w(t) - rho)^2`` with ``rho = target_sparsity``:
   the squared deviation of the marked fraction from its target, so all-zero (``rho^2``)
   and all-one (``(1 - rho)^2``) are both penalised (the seed's ``mean w`` rewarded zeros).
5. fidelity ``L_f`` on spoof utterances, from the frozen detector's spoof probabilities
   with all frames (``p_full``), with only the marked frames kept (``p_keep``) and with
   them removed (``p_remove``):
   ``L_f = max(0, log p_full - log p_keep) - log(1 - p_remove)``.
   Keeping the marked frames must preserve the detector's spoof evidence (no reward for
   exceeding it) and removing them must destroy it. The log form does not saturate when the
   detector is confident (``p`` near 0 or 1), where ``p_full - p_keep`` and ``p_remove``
   have vanishing gradients; probabilities are clamped to ``[1e-6, 1 - 1e-6]``.
   The frames are kept with budgeted weights ``k(t) = min(1, rho * T * a(t))`` and removed
   with ``1 - k(t)`` (:func:`keep_weights`): the keep/remove game is played with a fixed
   budget of ``rho`` of the frames, as the deletion/insertion metrics do. With raw ``w``
   as frame weights, an all-one ``w`` would keep everything and remove everything and so
   satisfy both halves (on a detector that adds up evidence over frames, ``w`` then
   spreads over every frame); with ``k``, any constant ``w`` keeps ``rho`` and leaves
   ``1 - rho`` of every frame, and ``w`` spread outside the evidence dilutes ``k`` on it.

   With ``xai.removal: bonafide`` a removed frame is replaced by the same frame of a bona fide
   reference utterance (:mod:`xai_lib.detector.removal`) instead of being zeroed, so "removed"
   means "what bona fide speech would have there" for every detector.
6. weak frame labels ``L_w = -(1/T) sum_t [y(t) log w(t) + (1 - y(t)) log(1 - w(t))]`` on all
   utterances, ``y(t)`` the frame's label: the utterance label on every frame (1 on a spoof
   utterance, 0 on a bona fide one), or on a spliced training crop 1 inside the inserted
   spoof span and 0 around it (:func:`span_frame_labels`). It anchors the *scale* of ``w``:
   a spoofed frame should read near 1 and a bona fide one near 0 on every corpus, so the
   importance cannot collapse in magnitude and covers a spoofed region whole rather than its
   most telling ``rho``.

Total: ``L = L_c + lambda_b L_b + lambda_t L_t + lambda_s L_s + lambda_f L_f + lambda_w L_w``
(seed defaults: ``tau = 0.07``, ``lambda_b = 0.1``, ``lambda_t = 0.1``, ``lambda_s = 0.01``);
``lambda_f = lambda_w = 0`` gives exactly the weighted sum of terms 1-4.

Why it cannot collapse: the seed weighted ``l(t)`` by raw ``w(t)`` and penalised
``mean w`` on spoof, so every term fell as ``w -> 0``. Here ``L_c`` depends on ``w`` only
through ``a`` (scale-free), ``L_s`` is minimal at ``mean w = rho`` rather than 0, and
``L_f`` compares a budgeted keep/remove of the frames ``w`` ranks highest, so a constant
``w`` (keep ``rho``, leave ``1 - rho`` of every frame) cannot satisfy it either.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from xai_lib.config import XAIConfig
from xai_lib.importance.module import NORMALIZE_EPS, SPOOF_INDEX, XAIOutput, normalized_importance

__all__ = [
    "frame_cross_entropy",
    "contrastive_loss",
    "bonafide_regularization",
    "temporal_smoothness",
    "spoof_sparsity",
    "fidelity_loss",
    "fidelity_probabilities",
    "keep_weights",
    "xai_loss",
    "span_frame_labels",
    "frame_label_loss",
]

PROB_EPS = 1e-6  # clamp for the log-probabilities of the fidelity term


def _float_mask(frame_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, T) float mask, all ones when None."""
    if frame_mask is None:
        return torch.ones_like(like)
    if frame_mask.shape != like.shape:
        raise ValueError(f"frame_mask has shape {tuple(frame_mask.shape)}, expected {tuple(like.shape)}")
    return frame_mask.to(like.dtype)


def _masked_mean(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B,) over ``selected`` (B,) utterances; 0 (in the graph) when none."""
    sel = selected.to(values.dtype)
    return (values * sel).sum() / sel.sum().clamp_min(1.0)


def _frame_mean(importance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of ``w`` over each utterance's valid frames."""
    return (importance * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def frame_cross_entropy(similarities: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-frame cross-entropy of ``softmax(similarities / tau)`` towards the utterance label.

    Args:
        similarities: (B, T, 2) cosine to [p_spoof, p_bona].
        labels: (B,) 1 = bona fide, 0 = spoof (the class column).
        temperature: ``tau``.

    Returns:
        (B, T) ``l(t) = -log softmax(s(t) / tau)[label]``.
    """
    log_probs = F.log_softmax(similarities / temperature, dim=-1)  # (B, T, 2)
    target = labels.long().view(-1, 1, 1).expand(-1, similarities.shape[1], 1)  # (B, T, 1)
    return -log_probs.gather(-1, target).squeeze(-1)


def contrastive_loss(
    importance: torch.Tensor,
    similarities: torch.Tensor,
    labels: torch.Tensor,
    frame_mask: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """``L_c``: importance-normalised frame cross-entropy (spoof), uniform average (bona fide).

    Args:
        importance: (B, T) ``w``.
        similarities: (B, T, 2) cosine to [p_spoof, p_bona].
        labels: (B,) 1 = bona fide, 0 = spoof.
        frame_mask: (B, T) True/1 = real frame; None = all real.
        temperature: ``tau``.

    Returns:
        Scalar: mean over utterances with at least one valid frame.
    """
    mask = _float_mask(frame_mask, importance)
    ce = frame_cross_entropy(similarities, labels, temperature)  # (B, T)
    ce = torch.where(mask > 0, ce, torch.zeros_like(ce))  # padded frames may hold anything
    a = normalized_importance(importance, mask)  # (B, T)
    uniform = mask / mask.sum(1, keepdim=True).clamp_min(1.0)  # (B, T)
    is_spoof = (labels == SPOOF_INDEX).unsqueeze(1)  # (B, 1)
    weights = torch.where(is_spoof, a, uniform)  # (B, T)
    per_utt = (weights * ce).sum(1)  # (B,)
    return _masked_mean(per_utt, mask.sum(1) > 0)


def bonafide_regularization(
    importance: torch.Tensor, labels: torch.Tensor, frame_mask: torch.Tensor | None
) -> torch.Tensor:
    """``L_b``: mean ``w`` over valid frames, averaged over bona fide utterances.

    Args:
        importance: (B, T) ``w``.
        labels: (B,) 1 = bona fide, 0 = spoof.
        frame_mask: (B, T); None = all real.

    Returns:
        Scalar (0 when the batch has no bona fide utterance).
    """
    mask = _float_mask(frame_mask, importance)
    return _masked_mean(_frame_mean(importance, mask), (labels != SPOOF_INDEX) & (mask.sum(1) > 0))


def temporal_smoothness(importance: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """``L_t``: mean ``|w(t) - w(t-1)|`` over pairs of consecutive valid frames.

    Averaged per utterance, then over utterances with at least two valid frames.

    Args:
        importance: (B, T) ``w``.
        frame_mask: (B, T); None = all real.

    Returns:
        Scalar.
    """
    mask = _float_mask(frame_mask, importance)
    pair = mask[:, 1:] * mask[:, :-1]  # (B, T-1)
    diffs = (importance[:, 1:] - importance[:, :-1]).abs() * pair  # (B, T-1)
    n_pairs = pair.sum(1)  # (B,)
    return _masked_mean(diffs.sum(1) / n_pairs.clamp_min(1.0), n_pairs > 0)


def spoof_sparsity(
    importance: torch.Tensor,
    labels: torch.Tensor,
    frame_mask: torch.Tensor | None,
    target_sparsity: float = 0.3,
) -> torch.Tensor:
    """``L_s``: squared deviation ``(mean_t w - rho)^2`` on spoof utterances.

    Args:
        importance: (B, T) ``w``.
        labels: (B,) 1 = bona fide, 0 = spoof.
        frame_mask: (B, T); None = all real.
        target_sparsity: ``rho``, the fraction of frames a spoof explanation should mark.

    Returns:
        Scalar (0 when the batch has no spoof utterance).
    """
    mask = _float_mask(frame_mask, importance)
    deviation = (_frame_mean(importance, mask) - target_sparsity) ** 2  # (B,)
    return _masked_mean(deviation, (labels == SPOOF_INDEX) & (mask.sum(1) > 0))


def fidelity_loss(
    spoof_prob_keep: torch.Tensor,
    spoof_prob_remove: torch.Tensor,
    spoof_prob_full: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """``L_f = max(0, log p_full - log p_keep) - log(1 - p_remove)`` on spoof utterances.

    Args:
        spoof_prob_keep: (B,) frozen detector's spoof probability with frame weights ``w``.
        spoof_prob_remove: (B,) the same with frame weights ``1 - w``.
        spoof_prob_full: (B,) the same with all frames (no gradient needed; detached here).
        labels: (B,) 1 = bona fide, 0 = spoof; bona fide utterances do not contribute.

    Returns:
        Scalar (0 when the batch has no spoof utterance).
    """
    p_keep = spoof_prob_keep.clamp(PROB_EPS, 1.0 - PROB_EPS)
    p_remove = spoof_prob_remove.clamp(PROB_EPS, 1.0 - PROB_EPS)
    p_full = spoof_prob_full.detach().clamp(PROB_EPS, 1.0 - PROB_EPS)
    per_utt = F.relu(torch.log(p_full) - torch.log(p_keep)) - torch.log1p(-p_remove)  # (B,)
    return _masked_mean(per_utt, labels == SPOOF_INDEX)


def fidelity_probabilities(
    backend_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    h_backend_input: torch.Tensor,
    importance: torch.Tensor,
    frame_mask: torch.Tensor | None,
    budget: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spoof probabilities of the frozen back end keeping / removing the important frames.

    Keep uses frame weights ``k = keep_weights(w, frame_mask, budget)`` (``w`` rescaled to a
    budget of ``budget`` of the frames, see :func:`keep_weights` and the module docstring for
    why not raw ``w``), remove uses ``1 - k``; padded frames get 0 in both.

    ``backend_fn`` runs once on a doubled batch (keep half, then remove half). Gradients flow
    through the (frozen) back end into ``importance``. ``p_full`` for :func:`fidelity_loss`
    should come from the same back end with all frames, e.g.
    ``softmax(backend_fn(h, mask, mask.float()))[:, 0]``, computed without gradient.

    Args:
        backend_fn: ``backend_fn(h (N, T, E), frame_mask (N, T) bool, frame_weights (N, T))
            -> logits (N, 2)``, the frozen back end applied to frames scaled by
            ``frame_weights``; column 1 = bona fide, so the spoof probability is
            ``softmax(logits)[:, 0]``. For the Stage-1 detector:
            ``lambda h, m, fw: detector.backend(h, m, frame_weights=fw).logits``.
        h_backend_input: (B, T, E) the back end's input for the batch.
        importance: (B, T) ``w`` at the same frame rate.
        frame_mask: (B, T); None = all real.
        budget: fraction of frames kept, ``cfg.target_sparsity`` (``rho``).

    Returns:
        ``(p_keep, p_remove)``: two (B,) tensors.
    """
    mask = _float_mask(frame_mask, importance)
    keep = keep_weights(importance, mask, budget)  # (B, T)
    weights = torch.cat([keep, (1.0 - keep) * mask], dim=0)  # (2B, T)
    h2 = torch.cat([h_backend_input, h_backend_input], dim=0)  # (2B, T, E)
    mask2 = torch.cat([mask, mask], dim=0) > 0  # (2B, T) bool
    logits = backend_fn(h2, mask2, weights)  # (2B, 2)
    p_spoof = F.softmax(logits.float(), dim=-1)[:, SPOOF_INDEX]  # (2B,)
    b = importance.shape[0]
    return p_spoof[:b], p_spoof[b:]


def keep_weights(
    importance: torch.Tensor,
    frame_mask: torch.Tensor | None = None,
    budget: float = 0.3,
    eps: float = NORMALIZE_EPS,
) -> torch.Tensor:
    """Importance rescaled to a fixed budget of kept frames: ``min(1, budget * T * a(t))``.

    ``a`` is :func:`~xai_lib.importance.module.normalized_importance` (so ``budget * T * a`` has mean
    ``budget`` over the ``T`` valid frames); clamping at 1 means at most a ``budget``
    fraction of the frame mass is kept. Depends on the shape of ``w``, not on its level.

    Args:
        importance: (B, T) ``w`` in [0, 1].
        frame_mask: (B, T); None = all real.
        budget: fraction of frames kept (``target_sparsity``), in (0, 1].
        eps: as in :func:`~xai_lib.importance.module.normalized_importance`.

    Returns:
        (B, T) in [0, 1], 0 on padded frames; a constant (or all-zero) ``w`` gives ``budget``
        on every valid frame.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"keep_weights: budget (xai.target_sparsity) must be in (0, 1], got {budget}")
    mask = _float_mask(frame_mask, importance)
    a = normalized_importance(importance, mask, eps)  # (B, T), sums to 1
    return (budget * mask.sum(1, keepdim=True) * a).clamp(max=1.0)


def span_frame_labels(spoof_spans: torch.Tensor, num_frames: int, hop_samples: int) -> torch.Tensor:
    """Frame labels of waves whose spoofed samples are ``[start, end)``: 1 where a frame's
    centre sample lies inside the span.

    Args:
        spoof_spans: (B, 2) long sample spans (``(0, 0)`` = nothing spoofed).
        num_frames: T, frames of the batch.
        hop_samples: samples per frame (320 for 20 ms at 16 kHz).

    Returns:
        (B, T) float in {0, 1}.
    """
    centres = (torch.arange(num_frames, device=spoof_spans.device) * hop_samples + hop_samples // 2)[None, :]
    start, end = spoof_spans[:, :1], spoof_spans[:, 1:]
    return ((centres >= start) & (centres < end)).float()


def frame_label_loss(importance: torch.Tensor, frame_labels: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """``L_w``: binary cross-entropy of ``w`` against the frame labels, per utterance then averaged.

    Args:
        importance: (B, T) ``w`` in [0, 1].
        frame_labels: (B, T) in {0, 1}.
        frame_mask: (B, T); None = all real.
    """
    mask = _float_mask(frame_mask, importance)
    w = importance.clamp(PROB_EPS, 1.0 - PROB_EPS)
    bce = F.binary_cross_entropy(w, frame_labels.to(w.dtype), reduction="none") * mask  # (B, T)
    n = mask.sum(1)
    return _masked_mean(bce.sum(1) / n.clamp_min(1.0), n > 0)


def xai_loss(
    out: XAIOutput,
    labels: torch.Tensor,
    frame_mask: torch.Tensor | None,
    cfg: XAIConfig,
    fidelity: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    frame_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full Stage-2 objective (see the module docstring for the formulas).

    Args:
        out: the :class:`~xai_lib.importance.module.XAIOutput` of the batch.
        labels: (B,) 1 = bona fide, 0 = spoof.
        frame_mask: (B, T); None = ``out.frame_mask``.
        cfg: weights and constants (``temperature``, ``lambda_*``, ``target_sparsity``).
        fidelity: ``(p_keep, p_remove, p_full)``, each (B,): ``fidelity_probabilities(backend_fn,
            h, out.importance, frame_mask, cfg.target_sparsity)`` plus the full-input spoof
            probability; required when ``cfg.lambda_fidelity > 0``; with ``lambda_fidelity = 0`` the term is
            only reported (detached), or 0 when not given.
        frame_labels: (B, T) weak frame labels (:func:`span_frame_labels`); default: each
            utterance's label on all its frames.

    Returns:
        ``(total, terms)`` with ``terms`` = ``{"contrastive", "bonafide_reg", "temporal_smooth",
        "sparsity", "fidelity", "frame", "total"}`` (unweighted terms, scalar tensors; ``total``
        is the weighted sum and carries the graph).

    Raises:
        ValueError: ``cfg.lambda_fidelity > 0`` but no fidelity probabilities were given.
    """
    w = out.importance  # (B, T)
    mask = out.frame_mask if frame_mask is None else frame_mask
    labels = labels.to(w.device)
    terms = {
        "contrastive": contrastive_loss(w, out.similarities, labels, mask, cfg.temperature),
        "bonafide_reg": bonafide_regularization(w, labels, mask),
        "temporal_smooth": temporal_smoothness(w, mask),
        "sparsity": spoof_sparsity(w, labels, mask, cfg.target_sparsity),
    }
    total = (
        terms["contrastive"]
        + cfg.lambda_bonafide_reg * terms["bonafide_reg"]
        + cfg.lambda_temporal_smooth * terms["temporal_smooth"]
        + cfg.lambda_sparsity * terms["sparsity"]
    )
    if cfg.lambda_fidelity > 0:
        if fidelity is None:
            raise ValueError(
                f"xai_loss: xai.lambda_fidelity is {cfg.lambda_fidelity} but no fidelity probabilities were "
                "passed; pass fidelity=(p_keep, p_remove, p_full) (see fidelity_probabilities) or set "
                "xai.lambda_fidelity: 0 to train the seed objective"
            )
        terms["fidelity"] = fidelity_loss(*fidelity, labels=labels)
        total = total + cfg.lambda_fidelity * terms["fidelity"]
    elif fidelity is not None:
        terms["fidelity"] = fidelity_loss(*fidelity, labels=labels).detach()
    else:
        terms["fidelity"] = w.new_zeros(())
    if frame_labels is None:
        frame_labels = (labels == SPOOF_INDEX).to(w.dtype)[:, None].expand_as(w)
    terms["frame"] = frame_label_loss(w, frame_labels, mask)
    if cfg.lambda_frame > 0:
        total = total + cfg.lambda_frame * terms["frame"]
    else:
        terms["frame"] = terms["frame"].detach()
    terms["total"] = total
    return total, terms

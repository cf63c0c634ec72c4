"""Stage-3 attribution API: which 20 ms frames made the detector decide.

One call returns a frame-level attribution for one of :data:`METHODS`, in captum's style::

    attributor = Attributor(detector, importance_model=xai)      # both frozen, never modified
    att = attributor.attribute(wave, lengths, method="integrated_gradients", target=0)
    att.scores                 # (B, T) float, higher = more responsible for the target decision
    att.per_utterance()        # B arrays (T_b,), padding removed
    att.normalized().scores    # per-utterance min-max over the valid frames

Methods
-------
``importance``
    The learned Stage-2 importance w(t) in [0, 1]: ``importance_model.frame_importance(
    detector, wave, lengths)`` (any object with that method, see :class:`ImportanceModel`).
    It explains "spoof" whatever ``target`` says (it was trained for that decision).
``integrated_gradients``
    ``captum.attr.IntegratedGradients`` on the waveform, zero (silence) baseline,
    ``n_steps=50`` (Gauss-Legendre), ``internal_batch_size`` interpolated waves per
    forward/backward. Signed toward the target logit: the frame scores of an utterance
    sum to ``logit_target(x) - logit_target(0)`` up to the convergence delta, which is
    returned in ``extras["convergence_delta"]`` (B,).
``saliency``
    ``captum.attr.Saliency``: the absolute gradient of the target logit w.r.t. every sample
    (captum's default ``abs=True``), so frame scores are non-negative sums of |grad|.
``occlusion``
    ``captum.attr.FeatureAblation`` with a ``feature_mask`` that groups the samples of
    each 20 ms frame (one feature per frame, the last frame running to the valid end),
    baseline 0: the score of a frame is ``logit_target(x) - logit_target(x with the frame
    silenced)``, signed toward the target (positive = the frame supported the decision).
    FeatureAblation was chosen over ``Occlusion`` because a feature mask aligns exactly
    with the detector's frames, including the longer last frame, and needs one forward
    per frame instead of per window position. Where the detector's conv feature encoder is
    local (:meth:`~xai_lib.detector.model.Detector.occlusion_reach`: XLS-R's layer-normalised
    convs, or the demo's first-layer statistics over 0.3 s), the same scores are computed
    without captum (``local=True``, the default): the conv frames once per utterance, then per
    silenced frame only the conv frames it reaches (from about 1 s of audio around it), and the
    transformer and back end on the whole utterance. Equal to FeatureAblation's to float
    rounding (tests/test_attribution.py); 1.8x faster on the demo detector, whose conv encoder
    is about 2/3 of a forward. ``extras["occlusion"]`` says which ran (``local``/``captum``).
``attention_rollout``
    Attention rollout (Abnar & Zuidema, 2020) of the TCM attention maps: per block the
    head-averaged attention (tokens: class token, T frames, H head tokens) plus the
    identity, row-normalised; the blocks are multiplied (last @ ... @ first) and the class
    token's row over the frame tokens 1..T is the score. Padded frames receive no
    attention (they are masked keys), so padding does not change the valid frames' scores.
    The TCM's direct addition of the frame mean to the class token is not an attention
    path and is not part of the rollout. Class-agnostic (``target`` is recorded only).
``grad_cam``
    Grad-CAM (Selvaraju et al., 2017) with ``captum.attr.LayerGradCam`` on the back end's
    last temporal layer: the detector's ``gradcam_tap``, a parameter-free ``nn.Identity``
    the back end calls on its last temporal features laid out (B, C, T'), on the path to
    the logits (TCM: the frame tokens entering the last Conformer block, whose class token
    alone feeds ``fc5``; see :class:`~xai_lib.detector.model.TCMConformer`). The weight of
    channel c is the gradient of the target logit averaged over the utterance's valid steps,
    and the score of step t is ``ReLU(sum_c weight_c * activation_c(t))`` (``relu=True``,
    the original Grad-CAM and the WeDefense practice; ``relu=False`` keeps the signed map).
    One forward and one backward through the back end only: the SSL features are computed
    without gradient. captum averages the gradient over all T' steps of the padded batch;
    the gradient of a padded step is 0 in a back end that masks padding (TCM), so the map is
    multiplied by ``T' / valid steps``, which makes it the utterance's map alone. A step
    covers ``gradcam_frames_per_step`` detector frames (TCM: 1, AASIST: 3) and is repeated
    over them; an utterance of n frames has ``n // gradcam_frames_per_step`` valid steps (the
    frames of no whole step, which such a back end does not see, and padding get 0); the
    result is trimmed/zero-padded to T. Raw scores, not normalised: calibrated like
    every other method.
``grad_cam_minmax05``
    The peer practice (WeDefense): the ``grad_cam`` map min-max normalised per utterance
    (over its valid frames; a constant map becomes 0) with the **fixed** frame threshold
    0.5 (:attr:`AttributionMethod.fixed_threshold`, recorded in ``extras["fixed_threshold"]``)
    instead of a calibrated one. Kept beside ``grad_cam`` so that the Stage-3 tables show
    what the label-free calibration changes: min-max makes every recording, bona fide ones
    included, reach 1 somewhere.
``random``
    Seeded uniform scores in [0, 1) (``seed`` kwarg), the floor any explanation must beat.

Pooling
-------
Gradient and ablation methods give one value per *sample*; :func:`pool_to_frames` is the
single place where samples become frames, for every method: frame ``t`` covers samples
``[t * 320, (t + 1) * 320)`` (20 ms at 16 kHz) and the last valid frame runs up to the
valid length; a frame's score is the **sum** of its samples' values. Occlusion's captum
output gives every sample of an ablated frame the frame's whole output change, so that
value is first spread evenly over the frame's valid samples (its share), and the pooled
sum is again exactly the output change. Padded frames are 0 in every method.

Guarantees: the detector is run in ``eval()`` (a detector passed in training mode is
switched to eval for the call and switched back, with a warning), its parameters and
buffers are never modified and no ``.grad`` is left on them: gradients are taken w.r.t.
the input waveform only (parameters' ``requires_grad`` is switched off for the call and
restored afterwards; Grad-CAM takes them w.r.t. its tap's output). Gradient-free methods
run under ``torch.no_grad()``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "METHOD_REGISTRY",
    "AttributionMethod",
    "AttributionBatch",
    "GRADIENT_METHODS",
    "SAMPLE_RATE",
    "HOP_SAMPLES",
    "FrameAttribution",
    "ImportanceModel",
    "Attributor",
    "attribute",
    "pool_to_frames",
    "minmax_per_utterance",
    "attention_rollout",
    "gradcam_layer",
    "synchronize",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP_SAMPLES = 320  # samples per 20 ms frame at 16 kHz (the detector's own hop is used when it has one)


@runtime_checkable
class ImportanceModel(Protocol):
    """Anything that gives learned frame importance for the detector's frames (Stage 2)."""

    def frame_importance(self, detector: nn.Module, wave: Tensor, lengths: Tensor | None) -> Tensor:
        """Importance w(t) in [0, 1], shape (B, T) with the detector's frame count."""
        ...


# ----------------------------------------------------------------------------- result


@dataclass
class FrameAttribution:
    """A frame-level attribution of a batch (what :meth:`Attributor.attribute` returns).

    Attributes:
        scores: (B, T) float32 on CPU, higher = more responsible for the ``target``
            decision; padded frames (``t >= lengths[b]``) are 0.
        lengths: (B,) long, valid frames per utterance.
        method: the method name (one of :data:`METHODS`).
        target: the explained class, 0 = spoof, 1 = bona fide.
        seconds: wall time of the call (device synchronised).
        frame_hop_s: seconds per frame (0.02); frame ``t`` starts at ``t * frame_hop_s``.
        extras: method-specific outputs, e.g. ``convergence_delta`` (B,) for IG.
    """

    scores: Tensor
    lengths: Tensor
    method: str
    target: int
    seconds: float
    frame_hop_s: float = 0.02
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def valid_mask(self) -> Tensor:
        """(B, T) bool, true on valid frames."""
        T = self.scores.shape[1]
        return torch.arange(T)[None, :] < self.lengths[:, None]

    def frame_times(self) -> np.ndarray:
        """(T,) start time in seconds of every frame."""
        return np.arange(self.scores.shape[1]) * self.frame_hop_s

    def per_utterance(self) -> list[np.ndarray]:
        """The scores of each utterance without padding: B float32 arrays (lengths[b],)."""
        return [self.scores[b, : int(n)].numpy().astype(np.float32) for b, n in enumerate(self.lengths)]

    def normalized(self) -> FrameAttribution:
        """A copy with each utterance's scores min-max scaled to [0, 1] over its valid frames.

        A constant utterance becomes all 0; padded frames stay 0.
        """
        return replace(self, scores=minmax_per_utterance(self.scores, self.lengths), extras=dict(self.extras))


def minmax_per_utterance(scores: Tensor, n_frames: Tensor) -> Tensor:
    """Each row min-max scaled to [0, 1] over its first ``n_frames[b]`` frames.

    Args:
        scores: (B, T) frame scores.
        n_frames: (B,) valid frames per row.

    Returns:
        (B, T): a constant row becomes all 0; padded frames are 0.
    """
    s = scores
    valid = torch.arange(s.shape[1], device=s.device)[None, :] < torch.as_tensor(n_frames, device=s.device)[:, None]
    lo = torch.where(valid, s, torch.full_like(s, float("inf"))).amin(dim=1, keepdim=True)  # (B, 1)
    hi = torch.where(valid, s, torch.full_like(s, float("-inf"))).amax(dim=1, keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    out = torch.where(ok, (s - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(s))
    return out * valid.to(out.dtype)


# ----------------------------------------------------------------------------- pooling


def pool_to_frames(
    sample_attr: Tensor,
    n_frames: Tensor,
    hop: int = HOP_SAMPLES,
    lengths: Tensor | None = None,
    num_frames: int | None = None,
) -> Tensor:
    """Sum sample-level attributions into frames (the one pooling used by every method).

    Frame ``t`` of utterance ``b`` covers samples ``[t * hop, (t + 1) * hop)``; its last
    valid frame ``n_frames[b] - 1`` extends to the end of the valid samples. Samples at or
    past ``lengths[b]`` are ignored, and frames ``t >= n_frames[b]`` are 0.

    Args:
        sample_attr: (B, L) per-sample attributions.
        n_frames: (B,) valid frames per utterance.
        hop: samples per frame (320 = 20 ms at 16 kHz).
        lengths: (B,) valid samples per utterance; ``None`` = all L.
        num_frames: width T of the output; ``None`` = ``max(n_frames)``.

    Returns:
        (B, T) frame sums, same dtype and device as ``sample_attr``.
    """
    if sample_attr.dim() != 2:
        raise ValueError(f"sample_attr must be (B, L), got shape {tuple(sample_attr.shape)}")
    B, L = sample_attr.shape
    device = sample_attr.device
    n_frames = torch.as_tensor(n_frames, dtype=torch.long, device=device).reshape(-1)
    if n_frames.numel() != B:
        raise ValueError(f"n_frames has {n_frames.numel()} entries for a batch of {B}")
    T = int(n_frames.max()) if num_frames is None and B else int(num_frames or 0)
    if bool((n_frames > T).any()):
        raise ValueError(f"n_frames {n_frames.tolist()} exceed num_frames={T}")
    lengths = (
        torch.full((B,), L, dtype=torch.long, device=device)
        if lengths is None
        else torch.as_tensor(lengths, dtype=torch.long, device=device).reshape(-1)
    )
    s = torch.arange(L, device=device)[None, :]  # (1, L)
    frame = torch.minimum(s // hop, (n_frames - 1).clamp_min(0)[:, None])  # (B, L)
    valid = (s < lengths[:, None]) & (n_frames[:, None] > 0)  # (B, L)
    frame = torch.where(valid, frame, torch.full_like(frame, T))  # invalid -> dummy column T
    out = torch.zeros(B, T + 1, dtype=sample_attr.dtype, device=device)
    out.scatter_add_(1, frame, torch.where(valid, sample_attr, torch.zeros_like(sample_attr)))
    return out[:, :T]


def _frame_feature_mask(L: int, n_frames: Tensor, lengths: Tensor, hop: int) -> tuple[Tensor, Tensor]:
    """FeatureAblation mask grouping each frame's samples, and each sample's share weight.

    Returns:
        mask: (B, L) long feature ids (frame index; padded samples join the last frame,
            where ablating them, zeros to zero, changes nothing).
        share: (B, L) float, 1 / (valid samples of the sample's frame), 0 on padding.
    """
    device = n_frames.device
    s = torch.arange(L, device=device)[None, :]  # (1, L)
    mask = torch.minimum(s // hop, (n_frames - 1).clamp_min(0)[:, None])  # (B, L)
    valid = s < lengths[:, None]
    T = int(n_frames.max())
    counts = torch.zeros(mask.shape[0], T, device=device)
    counts.scatter_add_(1, mask, valid.float())
    share = valid.float() / torch.gather(counts, 1, mask).clamp_min(1.0)
    return mask, share


# ----------------------------------------------------------------------------- rollout


def attention_rollout(attentions: tuple[Tensor, ...] | list[Tensor], num_frames: int) -> Tensor:
    """Class-token attention rollout over the frame tokens.

    Args:
        attentions: per block (B, H, M, M) softmax weights, token order [class token,
            ``num_frames`` frames, head tokens] (M = 1 + T + H_tokens).
        num_frames: T.

    Returns:
        (B, T) rollout of the class token onto each frame token.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one attention map")
    joint: Tensor | None = None
    for attn in attentions:
        a = attn.float().mean(dim=1)  # (B, M, M)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint  # (B, M, M)
    assert joint is not None
    return joint[:, 0, 1 : 1 + num_frames]  # (B, T)


# ----------------------------------------------------------------------------- attributor


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so that wall-clock timings are honest."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode with parameters not requiring grad; restore both after."""
    was_training = model.training
    if was_training:
        logger.warning("the detector was in training mode; attributing in eval() mode and switching back after")
        model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if was_training:
            model.train()


class Attributor:
    """Frame-level attributions of a frozen detector's decisions (captum-style).

    Args:
        detector: a Stage-1 :class:`~xai_lib.detector.model.Detector` (or anything with
            ``forward(wave, lengths, output_attentions) -> .logits/.attentions`` and
            ``num_frames(lengths)``). Never modified.
        importance_model: a Stage-2 model with ``frame_importance(detector, wave, lengths)``;
            needed only for ``method="importance"``.
        sample_rate: audio rate of the waveforms (the frame hop is 20 ms).
    """

    def __init__(
        self,
        detector: nn.Module,
        importance_model: ImportanceModel | None = None,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self.detector = detector
        self.importance_model = importance_model
        self.frame_hop_s = float(getattr(detector, "frame_hop_s", 0.02))
        self.hop = int(round(self.frame_hop_s * sample_rate))

    @property
    def device(self) -> torch.device:
        p = next(self.detector.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------------ public

    def attribute(
        self,
        wave: Tensor | np.ndarray,
        lengths: Tensor | None = None,
        method: str = "importance",
        target: int = 0,
        **kwargs: Any,
    ) -> FrameAttribution:
        """Attribute the detector's ``target`` decision to the 20 ms frames of ``wave``.

        Args:
            wave: (B, L) float waveform at 16 kHz, right-padded (a (L,) wave is one utterance).
            lengths: (B,) valid samples per utterance; ``None`` = all L.
            method: one of :data:`METHODS`.
            target: 0 = explain "spoof", 1 = explain "bona fide" (logit column).
            **kwargs: method options: ``integrated_gradients``: ``n_steps`` (50),
                ``internal_batch_size`` (default: B on a CPU, one interpolation step per pass;
                B x min(n_steps, 10) on a GPU), ``ig_method`` ("gausslegendre"); ``saliency``:
                ``abs`` (True); ``occlusion``: ``perturbations_per_eval`` (default: 1 frame
                ablated per forward on a CPU, 4 on a GPU), ``local`` (True: recompute only
                the conv frames a silenced frame reaches, where the detector allows it); ``grad_cam`` and
                ``grad_cam_minmax05``: ``relu`` (True); ``random``: ``seed`` (0).

        Returns:
            :class:`FrameAttribution` with scores (B, T), T = the detector's frame count for L.

        Raises:
            ValueError: unknown method/option, bad target or shapes, ``importance``
                without an importance model, or ``grad_cam`` on a detector without a
                ``gradcam_tap``.
        """
        spec = METHOD_REGISTRY.get(method)
        if spec is None:
            raise ValueError(f"unknown attribution method {method!r}; valid methods: {', '.join(METHODS)}")
        if target not in (0, 1):
            raise ValueError(f"target must be 0 (spoof) or 1 (bona fide), got {target!r}")
        allowed = spec.defaults
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"method {method!r} does not take option(s) {unknown}; it accepts: "
                f"{', '.join(allowed) if allowed else 'none'}"
            )
        opts = {**allowed, **kwargs}
        if method == "importance" and self.importance_model is None:
            raise ValueError(
                "method='importance' needs the Stage-2 XAI model: pass importance_model=<loaded XAI "
                "module with frame_importance(detector, wave, lengths)> to Attributor/attribute, "
                f"or pick a baseline method ({', '.join(m for m in METHODS if m != 'importance')})"
            )

        wave, lengths = self._prepare(wave, lengths)
        B, L = wave.shape
        n_frames = self.detector.num_frames(lengths.cpu()).to(torch.long)  # (B,)
        T = int(self.detector.num_frames(torch.tensor([L])).item())
        if bool((n_frames < 1).any()):
            raise ValueError(
                f"utterance(s) too short for one detector frame: lengths {lengths.tolist()} samples"
            )
        device = wave.device
        extras: dict[str, Any] = {}
        synchronize(device)
        t0 = time.perf_counter()
        batch = AttributionBatch(wave=wave, lengths=lengths, n_frames=n_frames.to(device), num_frames=T,
                                 target=target, extras=extras)
        with _frozen(self.detector):
            scores = spec.fn(self, batch, opts)  # (B, T)
        synchronize(device)
        seconds = time.perf_counter() - t0

        scores = scores.detach().float().cpu()
        if scores.shape != (B, T):
            raise RuntimeError(f"{method} produced scores of shape {tuple(scores.shape)}, expected {(B, T)}")
        valid = torch.arange(T)[None, :] < n_frames[:, None]
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        return FrameAttribution(
            scores=scores, lengths=n_frames.cpu(), method=method, target=target, seconds=seconds,
            frame_hop_s=self.frame_hop_s, extras=extras,
        )

    # ------------------------------------------------------------------ helpers

    def _prepare(self, wave: Tensor | np.ndarray, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        wave = torch.as_tensor(wave)
        if wave.dim() == 1:
            wave = wave[None, :]
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, L) samples (or (L,) for one utterance), got shape {tuple(wave.shape)}")
        wave = wave.detach().to(self.device, torch.float32)
        B, L = wave.shape
        if lengths is None:
            lengths = torch.full((B,), L, dtype=torch.long)
        lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1).to(self.device)
        if lengths.numel() != B:
            raise ValueError(f"lengths has {lengths.numel()} entries for a batch of {B} waves")
        if bool((lengths > L).any()) or bool((lengths < 1).any()):
            raise ValueError(f"lengths must lie in [1, {L}] (the padded length), got {lengths.tolist()}")
        return wave, lengths

    def _logits(self, wave: Tensor, lengths: Tensor) -> Tensor:
        """The captum forward function: waves (B', L) -> logits (B', 2)."""
        return self.detector(wave, lengths).logits


# ----------------------------------------------------------------------------- methods


@dataclass
class AttributionBatch:
    """What every attribution method receives (shapes after :meth:`Attributor._prepare`).

    Attributes:
        wave: (B, L) float waveform on the detector's device.
        lengths: (B,) valid samples.
        n_frames: (B,) valid detector frames.
        num_frames: T, the detector's frame count for L samples (the scores' width).
        target: 0 = explain "spoof", 1 = explain "bona fide".
        extras: method-specific outputs to return (e.g. IG's convergence delta).
    """

    wave: Tensor
    lengths: Tensor
    n_frames: Tensor
    num_frames: int
    target: int
    extras: dict[str, Any]


MethodFn = Callable[["Attributor", AttributionBatch, Mapping[str, Any]], Tensor]


@dataclass(frozen=True)
class AttributionMethod:
    """One entry of :data:`METHOD_REGISTRY`.

    Attributes:
        name: the method's name in configs, ``metrics.json`` and the viewer.
        fn: ``(attributor, batch, options) -> (B, T)`` frame scores.
        defaults: the options it accepts, with their defaults (anything else is an error).
        gradient: whether it backpropagates through the detector.
        description: one line for tables and the README.
        fixed_threshold: a frame threshold the method comes with, used as it is (no
            calibration; ``grad_cam_minmax05``: 0.5 on per-utterance min-max scores);
            ``None``: calibrated on bona fide dev frames like every method
            (:mod:`xai_lib.explanation.calibration`).
        requires: ``detector -> reason or None``: why the method cannot explain a detector
            (e.g. a back end without attention maps); ``None``: it explains any detector.
    """

    name: str
    fn: MethodFn
    defaults: Mapping[str, Any]
    gradient: bool
    description: str
    fixed_threshold: float | None = None
    requires: Callable[[nn.Module], str | None] | None = None


def _needs_attention_maps(detector: nn.Module) -> str | None:
    """A detector says with ``has_attention_maps`` whether it returns attention maps over the
    frames (one that does not say is assumed to)."""
    if getattr(detector, "has_attention_maps", True):
        return None
    return (f"not applicable to this detector: the {type(detector).__name__} back end has no attention maps "
            "over the frames to roll out (attention_rollout explains the TCM back end)")


def _needs_gradcam_tap(detector: nn.Module) -> str | None:
    try:
        gradcam_layer(detector)
    except ValueError:
        return (f"not applicable to this detector: the {type(detector).__name__} back end has no gradcam_tap "
                "(Grad-CAM's layer: its last temporal features, (B, C, T'), on the path to the logits)")
    return None


def _importance(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    with torch.no_grad():
        w = attributor.importance_model.frame_importance(attributor.detector, b.wave, b.lengths)  # type: ignore[union-attr]
    w = torch.as_tensor(w)
    if w.shape != (b.wave.shape[0], b.num_frames):
        raise ValueError(
            f"importance_model.frame_importance returned shape {tuple(w.shape)}, expected (B, T) = "
            f"{(b.wave.shape[0], b.num_frames)} (one value per detector frame)"
        )
    return w


def _integrated_gradients(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    from captum.attr import IntegratedGradients

    B = b.wave.shape[0]
    n_steps = int(opts["n_steps"])
    # on a CPU small passes are faster (cache-resident activations): batch 8 of 2.9 s utterances,
    # 1 thread, one step per pass 13.2 s vs ten 20.0 s; a GPU wants the wide passes
    ibs = opts["internal_batch_size"] or (B if b.wave.device.type == "cpu" else B * min(n_steps, 10))
    ig = IntegratedGradients(attributor._logits)
    attr, delta = ig.attribute(
        b.wave.clone().requires_grad_(True), baselines=torch.zeros_like(b.wave), target=b.target,
        additional_forward_args=(b.lengths,), n_steps=n_steps, method=opts["ig_method"],
        internal_batch_size=max(int(ibs), B), return_convergence_delta=True,
    )  # (B, L), (B,)
    b.extras["convergence_delta"] = delta.detach().float().cpu()
    b.extras["n_steps"] = n_steps
    return pool_to_frames(attr.detach(), b.n_frames, attributor.hop, b.lengths, b.num_frames)


def _saliency(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    from captum.attr import Saliency

    grad = Saliency(attributor._logits).attribute(
        b.wave.clone().requires_grad_(True), target=b.target, abs=bool(opts["abs"]), additional_forward_args=(b.lengths,)
    )  # (B, L)
    return pool_to_frames(grad.detach(), b.n_frames, attributor.hop, b.lengths, b.num_frames)


def _occlusion(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    # CPU: one frame per pass (batch 8 of 2.9 s utterances, 1 thread: 23.0 s vs 29.7 s with 4); GPU: 4
    per_eval = int(opts["perturbations_per_eval"] or (1 if b.wave.device.type == "cpu" else 4))
    det = attributor.detector
    reach = det.occlusion_reach() if opts["local"] and hasattr(det, "occlusion_reach") else None
    b.extras["occlusion"] = "local" if reach is not None else "captum"
    if reach is not None:
        return _local_occlusion(det, b, reach, per_eval)
    from captum.attr import FeatureAblation

    mask, share = _frame_feature_mask(b.wave.shape[1], b.n_frames, b.lengths, attributor.hop)  # (B, L) x2
    with torch.no_grad():
        attr = FeatureAblation(attributor._logits).attribute(
            b.wave, baselines=0.0, target=b.target, additional_forward_args=(b.lengths,),
            feature_mask=mask, perturbations_per_eval=per_eval,
        )  # (B, L): every sample holds its frame's output change
    return pool_to_frames(attr * share, b.n_frames, attributor.hop, b.lengths, b.num_frames)


def _local_occlusion(detector: nn.Module, b: AttributionBatch, reach: tuple[int, int], per_eval: int) -> Tensor:
    """FeatureAblation's scores (silence one frame, the last one to the valid end; the target
    logit's drop), with the conv feature encoder recomputed only around the silenced frame.

    The conv frames of the whole utterance are computed once; for each silenced frame ``k`` the
    audio of frames ``k - margin ... k + margin`` (with ``k``'s samples zeroed) goes through the
    conv encoder, its frames within ``reach`` of ``k`` replace the utterance's, and the
    transformer encoder and back end run on the whole utterance as before
    (:meth:`~xai_lib.detector.model.Detector.occlusion_reach` says why this is exact). On the
    demo detector the conv encoder is about 2/3 of a forward.
    """
    near, margin = reach
    det = detector
    hop, rf_samples = int(det.frame_hop_samples), int(det.min_input_samples)
    wave, lengths, n_frames = b.wave, b.lengths, b.n_frames.tolist()
    B, L = wave.shape
    padded = not bool((lengths == L).all())
    with torch.no_grad():
        base = det.conv_frames(wave, lengths)  # (B, T, D)
        logit0 = det.logits_from_conv_frames(base, lengths, padded)[:, b.target]  # (B,)
        jobs = [(k, r) for k in range(b.num_frames) for r in range(B) if k < n_frames[r]]
        scores = torch.zeros(B, b.num_frames, device=wave.device)
        step = per_eval * B
        for i in range(0, len(jobs), step):
            chunk = jobs[i : i + step]
            segs, seg_len, spans = [], [], []
            for k, r in chunk:
                n, valid = n_frames[r], int(lengths[r])
                s0, e0 = max(0, k - margin), min(n, k + margin + 1)
                end = valid if e0 == n else min(valid, e0 * hop + rf_samples - hop)
                seg = wave[r, s0 * hop : end].clone()
                seg[(k - s0) * hop : (valid if k == n - 1 else (k + 1) * hop) - s0 * hop] = 0.0
                segs.append(seg)
                seg_len.append(seg.numel())
                spans.append((max(0, k - near), min(n, k + near + 1), s0))
            width = max(seg_len)
            seg_wave = torch.stack([F.pad(x, (0, width - x.numel())) for x in segs])
            seg_frames = det.conv_frames(seg_wave, torch.tensor(seg_len, device=wave.device))  # (P, T_seg, D)
            rows = torch.tensor([r for _, r in chunk], device=wave.device)
            hidden = base[rows].clone()  # (P, T, D)
            for p, (j0, j1, s0) in enumerate(spans):
                hidden[p, j0:j1] = seg_frames[p, j0 - s0 : j1 - s0]
            logits = det.logits_from_conv_frames(hidden, lengths[rows], padded)[:, b.target]
            for p, (k, r) in enumerate(chunk):
                scores[r, k] = logit0[r] - logits[p]
    return scores


def _attention_rollout(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    with torch.no_grad():
        out = attributor.detector(b.wave, b.lengths, output_attentions=True)
    if not out.attentions:
        raise ValueError("the detector returned no attention maps; attention_rollout needs a TCM back end")
    return attention_rollout(out.attentions, b.num_frames)


def gradcam_layer(detector: nn.Module) -> tuple[nn.Module, int]:
    """The detector's Grad-CAM layer and how many detector frames one of its time steps covers.

    The back end's contract: a parameter-free ``gradcam_tap`` module (``nn.Identity``) called
    on its last temporal features laid out (B, C, T'), on the path to the logits, and an
    integer ``gradcam_frames_per_step``. Looked up on the detector, else on the one submodule
    that has them.

    Raises:
        ValueError: the detector has no ``gradcam_tap`` (or several candidates).
    """
    owners = [detector] if isinstance(getattr(detector, "gradcam_tap", None), nn.Module) else [
        m for m in detector.modules() if isinstance(getattr(m, "gradcam_tap", None), nn.Module)]
    if len(owners) != 1:
        raise ValueError(
            f"method 'grad_cam' needs a back end with a `gradcam_tap`: a parameter-free nn.Identity called on its "
            f"last temporal features (B, C, T') on the path to the logits, and an integer `gradcam_frames_per_step`; "
            f"{type(detector).__name__} has {'none' if not owners else f'{len(owners)} candidates'}. "
            f"Pick another method ({', '.join(m for m in METHODS if not m.startswith('grad_cam'))}) or add the tap."
        )
    owner = owners[0]
    fps = int(getattr(owner, "gradcam_frames_per_step", 1))
    if fps < 1:
        raise ValueError(f"{type(owner).__name__}.gradcam_frames_per_step must be >= 1, got {fps}")
    return owner.gradcam_tap, fps


def _grad_cam(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    from captum.attr import LayerGradCam

    det = attributor.detector
    tap, per_step = gradcam_layer(det)
    if hasattr(det, "frontend") and hasattr(det, "backend"):  # no graph through the SSL front end
        with torch.no_grad():
            feats, mask = det.frontend(b.wave, b.lengths)  # (B, T, D), (B, T)
        inputs, args = feats.detach(), (mask,)

        def forward(f: Tensor, m: Tensor) -> Tensor:
            return det.backend(f, m).logits
    else:
        inputs, args, forward = b.wave, (b.lengths,), attributor._logits
    cam = LayerGradCam(forward, tap).attribute(
        inputs, target=b.target, additional_forward_args=args, relu_attributions=bool(opts["relu"]),
    )  # (B, 1, T'): sum_c mean_t'(grad_c) * act_c(t'), ReLU'd
    if cam.dim() != 3 or cam.shape[1] != 1:
        raise RuntimeError(f"gradcam_tap must see (B, C, T') features; Grad-CAM came out {tuple(cam.shape)}")
    cam = cam[:, 0].detach()  # (B, T')
    steps = cam.shape[1]
    valid_steps = torch.div(b.n_frames, per_step, rounding_mode="floor").clamp(1, steps)  # (B,) whole steps
    step_valid = torch.arange(steps, device=cam.device)[None, :] < valid_steps[:, None]  # (B, T')
    cam = cam * (steps / valid_steps.to(cam.dtype))[:, None] * step_valid  # captum's mean over T' -> valid steps
    frames = cam.repeat_interleave(per_step, dim=1)[:, : b.num_frames]  # (B, <= T); frames of no whole step: 0
    b.extras["gradcam_steps"] = steps
    return F.pad(frames, (0, b.num_frames - frames.shape[1]))  # (B, T)


def _grad_cam_minmax(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    b.extras["fixed_threshold"] = METHOD_REGISTRY["grad_cam_minmax05"].fixed_threshold
    return minmax_per_utterance(_grad_cam(attributor, b, opts), b.n_frames)


def _random(attributor: Attributor, b: AttributionBatch, opts: Mapping[str, Any]) -> Tensor:
    gen = torch.Generator().manual_seed(int(opts["seed"]))
    return torch.rand(b.wave.shape[0], b.num_frames, generator=gen)


#: Every attribution method, in the order of tables and figures.
METHOD_REGISTRY: dict[str, AttributionMethod] = {
    m.name: m
    for m in (
        AttributionMethod("importance", _importance, {}, False, "learned Stage-2 importance w(t)"),
        AttributionMethod("integrated_gradients", _integrated_gradients,
                          {"n_steps": 50, "internal_batch_size": None, "ig_method": "gausslegendre"}, True,
                          "captum IntegratedGradients on the waveform, silence baseline"),
        AttributionMethod("saliency", _saliency, {"abs": True}, True, "captum Saliency, |gradient| per sample"),
        AttributionMethod("occlusion", _occlusion, {"perturbations_per_eval": None, "local": True}, False,
                          "20 ms frames silenced one at a time (captum FeatureAblation's scores)"),
        AttributionMethod("attention_rollout", _attention_rollout, {}, False, "attention rollout of the TCM blocks",
                          requires=_needs_attention_maps),
        AttributionMethod("grad_cam", _grad_cam, {"relu": True}, True,
                          "captum LayerGradCam on the back end's last temporal layer, ReLU",
                          requires=_needs_gradcam_tap),
        AttributionMethod("grad_cam_minmax05", _grad_cam_minmax, {"relu": True}, True,
                          "Grad-CAM min-max per utterance, fixed threshold 0.5 (WeDefense practice, not calibrated)",
                          fixed_threshold=0.5, requires=_needs_gradcam_tap),
        AttributionMethod("random", _random, {"seed": 0}, False, "seeded uniform scores (the floor)"),
    )
}
METHODS: tuple[str, ...] = tuple(METHOD_REGISTRY)
GRADIENT_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_REGISTRY.values() if m.gradient)


def attribute(
    detector: nn.Module,
    wave: Tensor | np.ndarray,
    lengths: Tensor | None = None,
    method: str = "importance",
    target: int = 0,
    importance_model: ImportanceModel | None = None,
    **kwargs: Any,
) -> FrameAttribution:
    """One-call form of :meth:`Attributor.attribute` (see there for the arguments)."""
    return Attributor(detector, importance_model).attribute(wave, lengths, method=method, target=target, **kwargs)

"""Stage 2: train the XAI module on the frozen Stage-1 detector.

::

    result = train_stage2(cfg, run_dir)              # finds, loads and freezes the detector
    metrics = stage2_report(result, cfg, run_dir)    # -> metrics.json["stage2"], figures
    xai = load_xai(result.checkpoint, detector=det)  # apply it (Stage 3)

What happens:

1. **The detector** is found by :func:`resolve_detector` (explicit path, else
   ``run_dir/stage1_detector.pth``, else the ``avg_5_best.pth`` fallback), loaded strictly
   (:func:`~xai_lib.detector.checkpoint.load_detector`; ``detector.config`` gives the
   architecture of a published state dict), every parameter frozen and kept in ``eval()``
   for the whole stage (no dropout, no BatchNorm statistics updates): its weights are
   bit-identical afterwards.
2. **The representation** ``h(t)`` is ``xai.representation``: the SSL output (``ssl``, what
   the original used) or the back end's frame tokens (``backend``), both computed without
   gradient (:func:`~xai_lib.importance.checkpoint.extract_representation`). The
   fidelity term always keeps/removes frames of the back end's *input* (the SSL features,
   through ``detector.backend(ssl, mask, frame_weights=...)``): for ``backend``, ``w`` is
   read from the frame tokens and applied to the same frame index of the back end's input.
3. **Prototypes**: ``fixed`` = the class means over the training set, computed once before
   training (:func:`~xai_lib.importance.module.class_means` over the deterministic first crop of
   every training utterance); ``learnable`` = initialised from the same class means, then
   trained;
   ``ema`` = set from the first training batch holding each class, then updated after
   every optimiser step from training batches only (never from dev/eval data: the update
   is a no-op outside training mode).
4. **Training**: :func:`~xai_lib.importance.loss.xai_loss` (collapse-proof contrastive term, bona fide
   regularisation, temporal smoothness, sparsity, fidelity), AdamW, fixed-length crops
   (``data.crop_samples``, seeded positions, no RawBoost: the explanation is of the
   detector's clean input), early stopping on the dev loss, the best-dev-loss weights kept,
   TensorBoard scalars under ``run_dir/logs/stage2_xai/``, a NaN guard, a resumable state in
   ``run_dir/checkpoints/stage2/last.pth``. Under ``torchrun`` the XAI module is wrapped in
   DistributedDataParallel (the frozen detector is not), each rank reads its shard, and
   class means / EMA updates are reduced over ranks.
5. **The product** ``run_dir/stage2_xai.pth`` (:func:`~xai_lib.importance.checkpoint.save_xai`):
   tensors + config + the detector's path and SHA-256; loads with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from xai_lib.config import ConfigError, Stage2Config, XAIConfig, config_to_dict, notebook_config, save_config
from xai_lib.data.datasets import EvalDataset, build_split, collate_padded
from xai_lib.data.protocols import Utterance
from xai_lib.detector.removal import BonafideReference
from xai_lib.importance.loss import fidelity_probabilities, span_frame_labels, xai_loss
from xai_lib.detector.checkpoint import load_detector
from xai_lib.detector.model import Detector
from xai_lib.files import file_sha256
from xai_lib.importance.checkpoint import save_xai
from xai_lib.importance.inference import (
    LoadedXAI,
    context_options,
    extract_representation,
    importance_per_utterance,
    representation_dim,
)
from xai_lib.importance.module import SPOOF_INDEX, XAIModule, class_means, smoothing_frames
from xai_lib.paths import PROJECT_ROOT, resolve_path
from xai_lib.training import (
    DistContext,
    EarlyStopping,
    ResumeError,
    check_finite,
    load_training_state,
    loop_state,
    restore_loop_state,
    save_training_state,
    start_run,
    SMOKE_OVERRIDES,
    summary_writer,
    training_loader,
)

__all__ = [
    "SMOKE_OVERRIDES",
    "stage2_config",
    "LOSS_TERMS",
    "NoStage1ModelError",
    "Stage2Result",
    "resolve_detector",
    "load_frozen_detector",
    "train_stage2",
    "evaluate_xai",
]

log = logging.getLogger(__name__)

STATE_NAME = "last.pth"
DETECTOR_NAME = "stage1_detector.pth"
CHECKPOINT_NAME = "stage2_xai.pth"
LOSS_TERMS = ("contrastive", "bonafide_reg", "temporal_smooth", "sparsity", "fidelity", "frame", "total")



def stage2_config(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    prototype_mode: str | None = None,
    lambda_fidelity: float | None = None,
    batch_size: int | None = None,
    num_epochs: int | None = None,
    seed: int | None = None,
    smoke: bool = False,
) -> Stage2Config:
    """The Stage-2 config of notebook 02's parameters (``None``: the config file's value).

    The notebook run by hand and the pipeline call this with their parameters, so both
    paths resolve the same config (see :func:`xai_lib.config.notebook_config`).
    """
    return notebook_config(
        config_path, Stage2Config, overrides, data_root=data_root,
        settings={"xai.prototype_mode": prototype_mode, "xai.lambda_fidelity": lambda_fidelity,
                  "training.batch_size": batch_size, "training.num_epochs": num_epochs, "training.seed": seed},
        final_overrides=SMOKE_OVERRIDES if smoke else (),
    )


# ----------------------------------------------------------------------------- the detector


class NoStage1ModelError(FileNotFoundError):
    """No Stage-1 detector was found where Stage 2 looks for one."""


def _fallback_candidates(fallback: str | Path) -> list[Path]:
    p = Path(fallback).expanduser()
    if p.is_absolute():
        return [p]
    out: list[Path] = []
    for base in (Path.cwd(), PROJECT_ROOT):
        cand = (base / p).resolve()
        if cand not in out:
            out.append(cand)
    return out


def resolve_detector(explicit: str | Path | None, run_dir: str | Path, fallback: str | Path = "avg_5_best.pth") -> Path:
    """Find the Stage-1 detector Stage 2 explains.

    Order: ``explicit`` (must exist), else ``run_dir/stage1_detector.pth``, else ``fallback``
    (a relative fallback is looked up in the current directory, then the project root).

    Args:
        explicit: a checkpoint path given by the user (``detector.path``, ``--detector``, the
            notebook's ``stage1_checkpoint``), or None / "" for the search.
        run_dir: the run directory.
        fallback: the published-checkpoint fallback (``detector.fallback``).

    Returns:
        The absolute path of the checkpoint.

    Raises:
        NoStage1ModelError: ``explicit`` does not exist, or nothing was found; the message lists
            every place looked at and the two remedies.
    """
    run_dir = Path(run_dir)
    if explicit:
        path = resolve_path(explicit)
        if path.is_file():
            return path
        raise NoStage1ModelError(
            f"No Stage 1 model found at the explicitly given path {explicit} (looked at {path}). Fix the path "
            "(detector.path in the Stage-2 config, --detector, or the notebook's stage1_checkpoint), or leave it "
            f"empty to use {run_dir / DETECTOR_NAME} or the fallback {fallback}."
        )
    in_run = (run_dir / DETECTOR_NAME).resolve()
    if in_run.is_file():
        return in_run
    candidates = _fallback_candidates(fallback)
    for cand in candidates:
        if cand.is_file():
            log.info("no %s in %s; using the fallback detector %s", DETECTOR_NAME, run_dir, cand)
            return cand
    looked = "\n".join(f"  - {p}" for p in [in_run, *candidates])
    raise NoStage1ModelError(
        "No Stage 1 model found. Stage 2 explains a trained Stage-1 detector and looked for one at:\n"
        f"{looked}\n"
        "Remedies:\n"
        f"  1. Train Stage 1 into this run directory: python -m xai_lib.pipeline --stage1 --run-dir {run_dir} "
        f"(or run notebooks/01_detector_training.ipynb with run_dir={run_dir}); it writes {run_dir / DETECTOR_NAME}.\n"
        f"  2. Copy an existing detector checkpoint to {run_dir / DETECTOR_NAME}, or to the fallback path "
        f"{fallback} (e.g. the published TCM avg_5_best.pth; a plain published state dict also needs "
        "detector.config, the YAML giving its architecture, e.g. configs/conformertcm_baseline.yaml). "
        "An explicit path also works: detector.path, --detector, or the notebook's stage1_checkpoint."
    )


def _freeze(detector: nn.Module) -> nn.Module:
    """No gradients, ``eval()`` (no dropout, BatchNorm uses its running statistics)."""
    detector.requires_grad_(False)
    detector.eval()
    return detector


def load_frozen_detector(path: str | Path, architecture: str | None = None, device: Any = "cpu") -> Detector:
    """Load a Stage-1 detector strictly and freeze it (no gradients, ``eval()``).

    Args:
        path: the checkpoint (ours or a published TCM state dict).
        architecture: only for a published state dict: the YAML giving its architecture
            (``detector.config``); resolved like other user paths.
        device: where to put it.
    """
    config = str(resolve_path(architecture)) if architecture else None
    detector = load_detector(path, config=config)
    return _freeze(detector.to(device))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- result


@dataclass
class Stage2Result:
    """What a Stage-2 training run produced.

    Attributes:
        checkpoint: ``run_dir/stage2_xai.pth`` (the best-dev-loss weights).
        detector_path: the frozen Stage-1 detector that was explained.
        detector_sha256: its SHA-256.
        history: per epoch, ``train_<term>`` and ``dev_<term>`` for every term of
            :data:`LOSS_TERMS` (unweighted terms; ``total`` is the weighted objective).
        epochs_completed: epochs trained (including ones before a resume).
        stopped_early: early stopping ended training.
        train_seconds: wall time of the epochs (accumulated over resumes).
        best_epoch: the 1-based epoch whose weights were saved.
    """

    checkpoint: Path
    detector_path: Path
    detector_sha256: str
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs_completed: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    best_epoch: int = 0


# ----------------------------------------------------------------------------- batches


def _forward_detector(
    detector: nn.Module, wave: Tensor, lengths: Tensor, kind: str, xai_cfg: XAIConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Representation, back-end input, frame mask and the full-input spoof probability (the
    detector's own pass and the local-context one share what they can, see
    :func:`~xai_lib.importance.inference.extract_representation`).

    Returns:
        h (B, T, D), ssl_features (B, T, D_ssl), frame_mask (B, T) bool, p_full (B,).
    """
    with torch.no_grad():
        if xai_cfg.context_s is None:
            ssl, mask = detector.frontend(wave, lengths)  # (B, T, D_ssl), (B, T)
            local = None
        else:
            local, ssl, mask = extract_representation(detector, wave, lengths, "ssl", full_features=True,
                                                      **context_options(xai_cfg))
        out = detector.backend(ssl, mask)
        if local is None:
            h = ssl if kind == "ssl" else out.frame_tokens  # (B, T, D)
        else:
            h = local if kind == "ssl" else detector.backend(local, mask).frame_tokens
        p_full = F.softmax(out.logits.float(), dim=-1)[:, SPOOF_INDEX]  # (B,)
    return h, ssl, mask, p_full


def _batch_loss(
    xai: nn.Module,
    detector: nn.Module,
    batch: dict[str, Any],
    cfg: Stage2Config,
    device: torch.device,
    grad: bool,
    reference: BonafideReference | None = None,
    offset: int = 0,
) -> tuple[Tensor, dict[str, Tensor], Tensor, Any, Tensor, Tensor]:
    """Loss of one batch. Returns (total, terms, h, XAIOutput, frame_mask, labels).

    ``reference``: the bona fide frames that replace removed ones in the fidelity term
    (``xai.removal: bonafide``); ``None`` zeroes them (``zero``). ``offset``: which reference
    the batch's first utterance uses (varied per step).
    """
    wave = batch["wave"].to(device)
    lengths = batch["lengths"].to(device)
    labels = batch["labels"].to(device)
    h, ssl, mask, p_full = _forward_detector(detector, wave, lengths, cfg.xai.representation, cfg.xai)
    frame_labels = None
    if "spoof_spans" in batch:
        frame_labels = span_frame_labels(batch["spoof_spans"].to(device), mask.shape[1], detector.frame_hop_samples)
    with torch.set_grad_enabled(grad):
        out = xai(h, mask)
        fid_grad = grad and cfg.xai.lambda_fidelity > 0
        with torch.set_grad_enabled(fid_grad):

            def backend_fn(x: Tensor, m: Tensor, keep: Tensor) -> Tensor:
                if reference is None:
                    return detector.backend(x, m, frame_weights=keep).logits
                return detector.backend(reference.remove(x, keep, offset), m).logits

            importance = out.importance if fid_grad else out.importance.detach()
            p_keep, p_remove = fidelity_probabilities(backend_fn, ssl, importance, mask, cfg.xai.target_sparsity)
        total, terms = xai_loss(out, labels, mask, cfg.xai, fidelity=(p_keep, p_remove, p_full),
                                frame_labels=frame_labels)
    return total, terms, h, out, mask, labels


@torch.no_grad()
def evaluate_xai(
    xai: nn.Module,
    detector: nn.Module,
    loader: DataLoader,
    cfg: Stage2Config,
    device: torch.device,
    ctx: DistContext | None = None,
    progress: bool = True,
    desc: str = "dev",
    reference: BonafideReference | None = None,
) -> dict[str, float]:
    """Mean of every loss term over ``loader`` (utterance-weighted, merged across ranks).

    The module is switched to ``eval()`` (dropout off, EMA prototypes frozen: an evaluation
    pass never changes them) and the detector is re-asserted in ``eval()``.
    """
    ctx = ctx or DistContext(device=device)
    xai.eval()
    detector.eval()
    sums = {k: 0.0 for k in LOSS_TERMS}
    count = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main)):
        n = len(batch["labels"])
        if n == 0:
            continue
        _, terms, *_ = _batch_loss(xai, detector, batch, cfg, device, grad=False, reference=reference)
        for k in LOSS_TERMS:
            sums[k] += float(terms[k].detach()) * n
        count += n
    if ctx.distributed:
        t = torch.tensor([*sums.values(), float(count)], dtype=torch.float64,
                         device=device if device.type == "cuda" else "cpu")
        ctx.all_reduce_sum(t)
        sums = dict(zip(LOSS_TERMS, t[:-1].tolist()))
        count = int(t[-1].item())
    return {k: v / max(count, 1) for k, v in sums.items()}


def _representation_batches(
    detector: nn.Module, loader: DataLoader, kind: str, device: torch.device, xai_cfg: XAIConfig
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(h (B, T, D), frame_mask (B, T), labels (B,))`` for :func:`class_means`."""
    for batch in loader:
        if len(batch["labels"]) == 0:
            continue
        h, _, mask = extract_representation(detector, batch["wave"].to(device), batch["lengths"].to(device), kind,
                                            full_features=False, **context_options(xai_cfg))
        yield h, mask, batch["labels"].to(device)


def _training_class_means(
    detector: nn.Module, utts: Sequence[Utterance], cfg: Stage2Config, ctx: DistContext, progress: bool
) -> Tensor:
    """(2, D) class means of the representation over the training set (row 0 spoof, 1 bona fide).

    Every training utterance contributes its first ``data.crop_samples`` samples (the
    deterministic crop, repeat-padded when shorter); each rank reads its shard and
    :func:`class_means` sums over ranks.
    """
    shard = list(utts)[ctx.rank :: ctx.world_size]
    ds = EvalDataset(shard, sample_rate=cfg.data.sample_rate, crop_samples=cfg.data.crop_samples,
                     on_bad_audio=cfg.data.on_bad_audio)
    loader = DataLoader(ds, batch_size=cfg.training.eval_batch_size, shuffle=False, collate_fn=collate_padded,
                        num_workers=cfg.data.num_workers)
    batches = _representation_batches(detector, loader, cfg.xai.representation, ctx.device, cfg.xai)
    return class_means(batches, progress=progress and ctx.is_main)


def _check_consistency(cfg: Stage2Config, detector: Detector, detector_path: Path) -> None:
    """Refuse, before any training, a config that cannot work with this detector."""
    need = int(detector.min_input_samples)
    if cfg.data.crop_samples < need:
        raise ConfigError(
            f"data.crop_samples={cfg.data.crop_samples} is shorter than the {need} samples the detector "
            f"{detector_path} needs for one frame; raise data.crop_samples"
        )
    if cfg.xai.lambda_fidelity > 0 and int(detector.num_frames(torch.tensor([cfg.data.crop_samples]))) < 2:
        raise ConfigError(
            f"data.crop_samples={cfg.data.crop_samples} gives the detector {detector_path} fewer than 2 frames; "
            "the importance of single-frame crops cannot be learned: raise data.crop_samples"
        )


# ----------------------------------------------------------------------------- training


def _param_groups(xai: XAIModule, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the importance network only: learnable prototypes are compared by cosine,
    so decay would only shrink their norm (and inflate their effective step size)."""
    protos = [p for n, p in xai.named_parameters() if n.startswith("prototypes.") and p.requires_grad]
    others = [p for n, p in xai.named_parameters() if not n.startswith("prototypes.") and p.requires_grad]
    groups = [{"params": others, "weight_decay": weight_decay}]
    if protos:
        groups.append({"params": protos, "weight_decay": 0.0})
    return groups


def _check_resumable(state: dict[str, Any], cfg: Stage2Config, sha: str, in_dim: int, path: Path) -> None:
    """Raise :class:`ResumeError` unless a resumable state belongs to this config and detector."""
    problems = []
    if state.get("detector_sha256") != sha:
        problems.append("it was trained on another detector file (different SHA-256)")
    saved = dict(state.get("xai_config") or {})
    now = config_to_dict(cfg.xai)
    changed = [f"xai.{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in now if saved.get(k) != now[k]]
    if changed:
        problems.append("its config differs (" + "; ".join(changed) + ")")
    if int(state.get("in_dim", -1)) != in_dim:
        problems.append(f"its representation dim is {state.get('in_dim')}, this detector's is {in_dim}")
    if problems:
        raise ResumeError(
            f"{path} belongs to another Stage-2 run: " + " and ".join(problems) + ". Pass resume=False "
            "(--no-resume) to start over in this run directory, or use a new run directory."
        )


def train_stage2(
    cfg: Stage2Config,
    run_dir: str | Path,
    detector_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Stage2Result:
    """Train the XAI module of ``cfg`` on the frozen Stage-1 detector into ``run_dir``.

    Args:
        cfg: the resolved Stage-2 config (``xai``, ``detector``, ``data``, ``training``).
        run_dir: the run directory; products: ``stage2_xai.pth``, ``config_stage2.yaml``,
            ``logs/stage2_xai/`` (TensorBoard), ``checkpoints/stage2/last.pth`` (resumable state).
        detector_path: explicit detector checkpoint; ``None``/"" = ``cfg.detector.path``, then
            the search of :func:`resolve_detector`.
        resume: continue from ``checkpoints/stage2/last.pth`` when it exists (finished epochs
            are not redone; an interrupted epoch restarts); ``False`` starts over.
        progress: show tqdm progress bars.

    Returns:
        :class:`Stage2Result`.

    Raises:
        NoStage1ModelError: no detector found (the message lists where it looked and what to do).
        CheckpointError: the detector file is unreadable or does not match its architecture.
        ConfigError: the config cannot work with this detector (e.g. crops shorter than a frame).
        NonFiniteLossError: the loss became NaN/inf (the last good state is kept).
        ResumeError: ``last.pth`` was written with another xai config or detector (and ``resume``).
    """
    run_dir = Path(run_dir)
    tc = cfg.training
    ctx = start_run(tc.device, tc.seed, tc.num_threads)
    device = ctx.device

    det_path = resolve_detector(detector_path or cfg.detector.path, run_dir, cfg.detector.fallback)
    detector = load_frozen_detector(det_path, cfg.detector.config, device)
    sha = file_sha256(det_path)
    _check_consistency(cfg, detector, det_path)
    kind = cfg.xai.representation
    smooth = smoothing_frames(cfg.xai.importance_smoothing_s, detector.frame_hop_s)
    crop_frames = int(detector.num_frames(torch.tensor([cfg.data.crop_samples])).item())
    if smooth > 1 and 3 * smooth > crop_frames:
        log.warning("xai.importance_smoothing_s=%s averages w over %d of the %d frames of a training crop "
                    "(data.crop_samples=%d): w is nearly constant within a crop and learns little; keep the "
                    "smoothing below a third of the crop", cfg.xai.importance_smoothing_s, smooth, crop_frames,
                    cfg.data.crop_samples)
    in_dim = representation_dim(detector, kind)
    log.info("Stage 2 on the frozen detector %s (sha256 %s...), %s representation of dim %d",
             det_path, sha[:12], kind, in_dim)
    detector_state = {k: v.detach().clone() for k, v in detector.state_dict().items()}

    ckpt_dir = run_dir / "checkpoints" / "stage2"
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    # random crop positions (seeded by seed, epoch, index); no RawBoost: we explain clean input
    train_ds, sampler, train_loader = training_loader(cfg.data, tc, ctx, rawboost_algo=0)
    train_utts = train_ds.utts
    reference = bonafide_reference(detector, train_utts, cfg) if cfg.xai.removal == "bonafide" else None
    dev_utts = build_split(cfg.data, "dev")
    dev_ds = EvalDataset(dev_utts, sample_rate=cfg.data.sample_rate, crop_samples=cfg.data.crop_samples,
                         on_bad_audio=cfg.data.on_bad_audio, cache_mb=cfg.data.cache_audio_mb)
    dev_sampler = DistributedSampler(dev_ds, shuffle=False, drop_last=False) if ctx.distributed else None
    dev_loader = DataLoader(dev_ds, batch_size=tc.eval_batch_size, shuffle=False, sampler=dev_sampler,
                            collate_fn=collate_padded, num_workers=cfg.data.num_workers)

    xai = XAIModule(in_dim, cfg.xai).to(device)
    optimizer = torch.optim.AdamW(_param_groups(xai, tc.weight_decay), lr=tc.lr)
    early = EarlyStopping(tc.patience)
    history: dict[str, list[float]] = {f"{split}_{k}": [] for split in ("train", "dev") for k in LOSS_TERMS}
    start_epoch, global_step, elapsed = 0, 0, 0.0
    best_state: dict[str, Tensor] | None = None
    best_epoch = 0
    stopped_early = False
    state_path = ckpt_dir / STATE_NAME
    state = load_training_state(state_path) if resume else None
    if not resume and ctx.is_main and state_path.is_file():
        state_path.unlink()  # a fresh start must never be "resumed" from the previous run's state
        log.info("starting Stage 2 from scratch in %s (resume=False): the previous resumable state was removed", run_dir)
    ctx.barrier()
    if state is not None:
        _check_resumable(state, cfg, sha, in_dim, state_path)
    if ctx.is_main:  # only after a refused resume could no longer happen: the run's config stays intact
        save_config(cfg, run_dir / "config_stage2.yaml")
    if state is not None:
        history, start_epoch, global_step, elapsed = restore_loop_state(state, "xai", xai, optimizer, early)
        best_state, best_epoch = state["best_state"], int(state["best_epoch"])
        stopped_early = bool(state.get("stopped", False))
        log.info("resumed Stage 2 from %s after %d completed epochs", state_path, start_epoch)
    elif cfg.xai.prototype_mode in ("fixed", "learnable"):
        means = _training_class_means(detector, train_utts, cfg, ctx, progress)
        xai.prototypes.set_from_class_means(means)
        log.info("%s prototypes set from the training-set class means", cfg.xai.prototype_mode)

    train_model: nn.Module = xai
    if ctx.distributed:
        train_model = DDP(xai, device_ids=[device.index] if device.type == "cuda" else None)
    # events at or after the first step this run writes (left by an interrupted or earlier run) are hidden
    writer = summary_writer(run_dir / "logs" / "stage2_xai", enabled=ctx.is_main, completed_steps=global_step)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, tc.num_epochs):
            if stopped_early:
                break
            t0 = time.perf_counter()
            detector.eval()  # re-asserted every epoch: nothing here may switch it to training
            train_model.train()
            train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sums = {k: 0.0 for k in LOSS_TERMS}
            n_seen = 0
            bar = tqdm(train_loader, desc=f"stage2 epoch {epoch + 1}/{tc.num_epochs}",
                       disable=not (progress and ctx.is_main))
            for step, batch in enumerate(bar):
                if tc.max_steps_per_epoch is not None and step >= tc.max_steps_per_epoch:
                    break
                loss, terms, h, out, mask, labels = _batch_loss(train_model, detector, batch, cfg, device, grad=True,
                                                                reference=reference, offset=global_step)
                check_finite(loss, global_step, "Stage 2", last_good=state_path, ctx=ctx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                xai.prototypes.update(h, out.importance.detach(), labels, mask)  # ema only; train mode only
                global_step += 1
                n = len(labels)
                for k in LOSS_TERMS:
                    sums[k] += float(terms[k].detach()) * n
                n_seen += n
                writer.add_scalar("train/total_step", float(loss.detach()), global_step)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if not xai.prototypes.is_ready:  # an epoch cut short never saw one class (smoke runs)
                _complete_ema_prototypes(xai, detector, train_utts, cfg, ctx, progress)
            train_terms = {k: ctx.all_reduce_mean(v / max(n_seen, 1)) for k, v in sums.items()}
            dev_terms = evaluate_xai(xai, detector, dev_loader, cfg, device, ctx, progress,  # unwrapped: no collectives
                                     reference=reference)
            elapsed += time.perf_counter() - t0
            for k in LOSS_TERMS:
                history[f"train_{k}"].append(train_terms[k])
                history[f"dev_{k}"].append(dev_terms[k])
                writer.add_scalar(f"train/{k}", train_terms[k], epoch + 1)
                writer.add_scalar(f"dev/{k}", dev_terms[k], epoch + 1)
            writer.flush()
            log.info("epoch %d: train %.4f dev %.4f (dev contrastive %.4f, fidelity %.4f)", epoch + 1,
                     train_terms["total"], dev_terms["total"], dev_terms["contrastive"], dev_terms["fidelity"])
            if not math.isfinite(dev_terms["total"]):
                check_finite(torch.tensor(dev_terms["total"]), global_step, "Stage 2 (dev loss)", last_good=state_path)
            if early.step(dev_terms["total"]) or best_state is None:
                best_state = {k: v.detach().cpu().clone() for k, v in xai.state_dict().items()}
                best_epoch = epoch + 1
            stopped_early = early.should_stop
            if ctx.is_main:
                save_training_state(
                    state_path,
                    loop_state("xai", xai, optimizer, early, history, epoch + 1, global_step, elapsed, stopped_early,
                               best_state=best_state, best_epoch=best_epoch, xai_config=config_to_dict(cfg.xai),
                               in_dim=in_dim, detector_sha256=sha),
                )
            ctx.barrier()
            if stopped_early:
                log.info("early stopping after epoch %d (no dev-loss improvement for %d epochs)", epoch + 1, tc.patience)
                break
    finally:
        writer.close()

    _assert_unchanged(detector, detector_state, det_path)
    final = run_dir / CHECKPOINT_NAME
    if best_state is None:  # no epoch ran (num_epochs reached before a resume): keep the current weights
        best_state = {k: v.detach().cpu().clone() for k, v in xai.state_dict().items()}
    if ctx.is_main:
        xai.load_state_dict(best_state)
        dev_total = history["dev_total"][best_epoch - 1] if best_epoch and history["dev_total"] else None
        calibration = calibrate_importance(
            LoadedXAI(module=xai, config=cfg.xai, representation=kind, in_dim=in_dim), detector, dev_utts, cfg)
        save_xai(
            xai, final, cfg.xai, det_path, sha, calibration=calibration, removal_reference=reference,
            extra={
                "best_epoch": best_epoch,
                "best_dev_loss": dev_total,
                "epochs_completed": len(history["train_total"]),
                "stopped_early": stopped_early,
                "train_seconds": elapsed,
                "prototype_mode": cfg.xai.prototype_mode,
            },
        )
    ctx.barrier()
    return Stage2Result(
        checkpoint=final,
        detector_path=det_path,
        detector_sha256=sha,
        history=history,
        epochs_completed=len(history["train_total"]),
        stopped_early=stopped_early,
        train_seconds=elapsed,
        best_epoch=best_epoch,
    )


def calibrate_importance(
    xai: LoadedXAI, detector: nn.Module, utts: Sequence[Utterance], cfg: Stage2Config
) -> dict[str, Any] | None:
    """The label-free frame threshold of ``w``: the ``1 - xai.false_flag_rate`` quantile of ``w``
    over every frame of the bona fide utterances among ``utts`` (the dev split), see
    :func:`xai_lib.explanation.calibration.calibration_record`. ``None`` (with a warning) when
    there is no bona fide utterance."""
    from xai_lib.explanation.calibration import calibration_record

    bona = [u for u in utts if u.label == 1]
    if not bona:
        log.warning("no bona fide dev utterance: the importance is not calibrated (no frame threshold stored)")
        return None
    ds = EvalDataset(bona, sample_rate=cfg.data.sample_rate, crop_samples=cfg.data.eval_crop_samples,
                     on_bad_audio=cfg.data.on_bad_audio, min_samples=detector.min_input_samples)
    waves = [it["wave"] for it in (ds[i] for i in range(len(ds))) if it is not None]
    scores = importance_per_utterance(xai, detector, waves, cfg.training.eval_batch_size)
    record = calibration_record(scores, cfg.xai.false_flag_rate, split="dev")
    log.info("calibrated w on %d bona fide dev utterances (%d frames): threshold %.4f at a false-flag rate of %g",
             record["n_utterances"], record["n_frames"], record["threshold"], record["false_flag_rate"])
    return record


REFERENCE_MAX_S = 4.0  # seconds of each bona fide reference utterance kept (tiled when shorter)


def bonafide_reference(detector: nn.Module, utts: Sequence[Utterance], cfg: Stage2Config) -> BonafideReference:
    """The bona fide reference of the fidelity term and the deletion metrics.

    Candidates: ``4 * xai.reference_utterances`` bona fide training utterances drawn with
    ``training.seed`` (the first ``REFERENCE_MAX_S`` seconds of each); kept: those the
    detector scores most like typical bona fide speech (:meth:`BonafideReference.from_utterances`).
    """
    from xai_lib.data.audio import load_audio

    bona = [u for u in utts if u.label == 1]
    if not bona:
        raise ConfigError("xai.removal: bonafide needs bona fide training utterances; the training split has none")
    k = cfg.xai.reference_utterances
    rng = np.random.default_rng(cfg.training.seed)
    picks = sorted(rng.choice(len(bona), size=min(len(bona), 4 * k), replace=False).tolist())
    max_samples = int(REFERENCE_MAX_S * cfg.data.sample_rate)
    waves = [load_audio(bona[i].path, cfg.data.sample_rate)[:max_samples] for i in picks]
    waves = [w for w in waves if len(w) >= detector.min_input_samples]
    return BonafideReference.from_utterances(detector, waves, k=k)


def _complete_ema_prototypes(
    xai: XAIModule, detector: nn.Module, utts: Sequence[Utterance], cfg: Stage2Config, ctx: DistContext, progress: bool
) -> None:
    """Set EMA prototypes that no training batch initialised from the training-set class means."""
    means = _training_class_means(detector, utts, cfg, ctx, progress)
    with torch.no_grad():
        for c in range(2):
            if not bool(xai.prototypes.initialized[c]):
                xai.prototypes.prototypes[c].copy_(means[c].to(xai.prototypes.prototypes))
                xai.prototypes.initialized[c] = True
    log.warning("the training batches of this epoch did not hold both classes; the missing EMA prototype was "
                "set from the training-set class mean")


def _assert_unchanged(detector: nn.Module, reference: dict[str, Tensor], path: Path) -> None:
    """The frozen detector must come out of Stage 2 bit-identical (a bug otherwise)."""
    changed = [k for k, v in detector.state_dict().items() if not torch.equal(v, reference[k])]
    if changed:
        raise RuntimeError(f"internal error: Stage 2 modified the frozen detector {path}: {', '.join(changed[:10])}")
    if detector.training:
        raise RuntimeError("internal error: the frozen detector left eval() mode during Stage 2")

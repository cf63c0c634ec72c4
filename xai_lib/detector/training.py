"""Stage 1: train the SSL + Conformer-TCM detector.

Weighted cross-entropy (spoof 0.1, bona fide 0.9), Adam/AdamW with an optional learning-rate
schedule (``training.lr_schedule``, :func:`scheduled_lr`), RawBoost on the fly, early stopping on
the dev loss, the N best epochs averaged into ``stage1_detector.pth``,
resumable after an interruption (even a SIGKILL), TensorBoard scalars under
``run_dir/logs/stage1_detector``. Runs single-process or, unchanged, under ``torchrun``
(DistributedDataParallel)::

    cfg = load_config("configs/demo.yaml", Stage1Config)
    result = train_stage1(cfg, "outputs/r1")          # Stage1Result
    detector = load_detector(result.checkpoint)
    metrics = stage1_report(detector, cfg, "outputs/r1", result.history)

``training.batch_size`` is the GLOBAL batch: under torchrun each of N ranks takes
``batch_size // N`` utterances per step, the loss is normalised by the global batch and
BatchNorm statistics are computed over the global batch, so N ranks take the same steps as
one process (up to floating-point summation order).
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xai_lib.config import ConfigError, ModelConfig, Stage1Config, config_from_dict, config_to_dict, notebook_config, save_config
from xai_lib.data.datasets import EvalDataset, build_split, collate_padded, scan_audio
from xai_lib.data.protocols import Utterance
from xai_lib.detector.metrics import utterance_eer
from xai_lib.detector.checkpoint import FORMAT_NAME, average_state_dicts, save_detector
from xai_lib.files import atomic_torch_save, safe_torch_load, unwrap_model
from xai_lib.detector.model import Detector, build_detector
from xai_lib.training import (
    BestCheckpoints,
    DistContext,
    EarlyStopping,
    ResumeError,
    check_finite,
    load_training_state,
    loop_state,
    restore_loop_state,
    save_training_state,
    start_run,
    summary_writer,
    training_loader,
    wrap_ddp,
)
from xai_lib.training import SMOKE_OVERRIDES as _COMMON_SMOKE

__all__ = [
    "STATE_NAME",
    "SMOKE_OVERRIDES",
    "stage1_config",
    "Stage1Result",
    "train_stage1",
    "scheduled_lr",
    "evaluate_detector",
    "score_utterances",
    "stage1_report",
    "read_asv_scores",
    "store_score_threshold",
]

log = logging.getLogger(__name__)

#: The resumable state, ``run_dir/checkpoints/stage1/last.pth`` (written after every epoch).
STATE_NAME = "last.pth"


@dataclass
class Stage1Result:
    """What a Stage-1 training run produced.

    Attributes:
        checkpoint: ``run_dir/stage1_detector.pth`` (the average of the N best epochs).
        history: per epoch: ``train_loss``, ``dev_loss``, ``dev_eer`` (fraction; NaN for an epoch
            whose dev set was not scored, see ``training.dev_last_epochs``), ``epoch_seconds`` and
            ``train_utts_per_s`` (training steps only, all ranks).
        best_epochs: the 1-based epochs averaged into the checkpoint.
        epochs_completed: epochs finished, over all (resumed) sessions.
        stopped_early: early stopping ended the run.
        train_seconds: wall time of the epochs (training + dev evaluation), over all sessions.
    """

    checkpoint: Path
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epochs: list[int] = field(default_factory=list)
    epochs_completed: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0


# ----------------------------------------------------------------------------- loss, helpers


def _weighted_ce(logits: Tensor, y: Tensor, weights: Tensor, ctx: DistContext) -> tuple[Tensor, Tensor]:
    """Class-weighted cross-entropy normalised by the GLOBAL batch weight.

    ``F.cross_entropy(weight=...)`` divides by the weight sum of the local batch; under DDP
    (which averages gradients over ranks) that would differ from one process seeing the
    whole batch. Dividing by the all-reduced weight sum (over the world size, undone by
    DDP's averaging) makes N ranks compute exactly the single-process gradient.

    Args:
        logits: (B, 2) float; y: (B,) long in {0, 1}; weights: (2,) [spoof, bona fide].

    Returns:
        loss: this rank's term to back-propagate (scalar).
        global_loss: the loss of the whole global batch (detached scalar, identical on every
            rank; NaN/inf when any rank's loss is), for logging and the NaN guard.
    """
    per_utt = F.cross_entropy(logits, y, weight=weights, reduction="none")  # (B,) = w_y * nll
    local = torch.stack([weights[y].sum(), per_utt.sum()]).detach().double()  # (2,)
    if ctx.distributed:
        local = ctx.all_reduce_sum(local.to(ctx.comm_device)).to(logits.device)  # one collective per step
    wsum, total = local[0], local[1]
    loss = per_utt.sum() / (wsum.to(per_utt.dtype) / ctx.world_size).clamp_min(1e-12)
    return loss, (total / wsum.clamp_min(1e-12)).float()


def scheduled_lr(
    step: int, total_steps: int, lr: float, schedule: str = "constant", warmup_steps: float = 0.0,
    min_lr_ratio: float = 0.0, decay_steps: float | None = None,
) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps`` (``training.lr_schedule``).

    - ``constant``: ``lr`` (after a linear warm-up when ``warmup_steps`` > 0);
    - ``cosine``: linear warm-up to ``lr`` (step i of W: ``lr * (i + 1) / W``), ``lr`` until the
      last ``decay_steps`` steps (``None``: every step after the warm-up), over which half a cosine
      takes it down to ``lr * min_lr_ratio`` at the last step;
    - ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR``'s curve (``anneal_strategy="cos"``,
      ``div_factor=25``, no momentum cycling): half a cosine up from ``lr / 25`` to ``lr`` over the
      warm-up, then half a cosine down to ``lr * min_lr_ratio``.

    A function of the step count only, so a resumed run continues the same curve. Steps past the
    end keep the final value.
    """
    total = max(int(total_steps), 1)
    warm = min(max(float(warmup_steps), 0.0), float(total))
    step = min(max(int(step), 0), total - 1)
    floor = lr * min_lr_ratio

    def cos_between(start: float, end: float, frac: float) -> float:
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))

    if schedule == "onecycle":
        peak = max(warm - 1.0, 0.0)  # OneCycleLR's last warm-up step, where lr peaks
        if step <= peak and peak > 0:
            return cos_between(lr / 25.0, lr, step / peak)
        return cos_between(lr, floor, (step - peak) / max(total - 1 - peak, 1.0))
    if step < warm:
        return lr * (step + 1) / warm
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        start = warm if decay_steps is None else max(warm, total - float(decay_steps))
        if step < start:
            return lr
        return cos_between(lr, floor, (step - start) / max(total - 1 - start, 1.0))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def _dev_scored(epoch: int, num_epochs: int, last_epochs: int | None = None) -> bool:
    """Whether the dev set is scored after 1-based ``epoch``: after each of the last ``last_epochs``
    epochs (``None``: after every epoch)."""
    return last_epochs is None or epoch > num_epochs - last_epochs


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _by_length(utts: Sequence[Utterance]) -> list[Utterance]:
    """Utterances ordered longest first (from file headers): batches need little padding and
    sharding the sorted list gives every rank a similar amount of audio."""
    def frames(u: Utterance) -> float:
        try:
            info = sf.info(str(u.path))
            return info.frames / max(info.samplerate, 1)
        except Exception:  # unreadable files are reported when loaded
            return 0.0

    return sorted(utts, key=lambda u: (-frames(u), u.utt_id))


def _eer_from(scores: dict[str, float], labels: dict[str, int]) -> float:
    bona = np.array([s for u, s in scores.items() if labels.get(u) == 1])
    spoof = np.array([s for u, s in scores.items() if labels.get(u) == 0])
    if len(bona) == 0 or len(spoof) == 0 or not (np.isfinite(bona).all() and np.isfinite(spoof).all()):
        return float("nan")
    return float(utterance_eer(bona, spoof)[0])


def _eval_loader(utts: Sequence[Utterance], cfg: Stage1Config, ctx: DistContext, crop: int | None) -> DataLoader:
    """This rank's shard (no padding or duplicates, unlike ``DistributedSampler``) of ``utts``."""
    ds = EvalDataset(
        ctx.shard(_by_length(utts)),
        sample_rate=cfg.data.sample_rate,
        crop_samples=crop,
        on_bad_audio=cfg.data.on_bad_audio,
        cache_mb=cfg.data.cache_audio_mb,
    )
    return DataLoader(
        ds,
        batch_size=cfg.training.eval_batch_size,
        shuffle=False,
        collate_fn=collate_padded,
        num_workers=cfg.data.num_workers,
    )


@torch.no_grad()
def evaluate_detector(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    class_weights: Tensor,
    ctx: DistContext | None = None,
    bf16: bool = False,
    desc: str = "dev",
    progress: bool = True,
) -> tuple[float, dict[str, float], dict[str, int]]:
    """Weighted-CE loss and scores over ``loader`` (merged across ranks).

    Under torchrun each rank passes a loader over ITS shard of the utterances; the results
    are gathered, so every rank returns the same values.

    Returns:
        (loss, {utt: score}, {utt: label}); loss = sum(w_y * nll) / sum(w_y) over the
        labelled utterances (the training loss's normalisation); score = bona fide logit.
    """
    ctx = ctx or DistContext(device=device)
    net = unwrap_model(model)
    net.eval()
    loss_sum, weight_sum = 0.0, 0.0
    scores: dict[str, float] = {}
    labels: dict[str, int] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main)):
        if not batch["utt_ids"]:
            continue  # every item skipped (bad audio)
        wave = batch["wave"].to(device)  # (B, L) right-padded
        lengths = batch["lengths"].to(device)  # (B,)
        y = batch["labels"].to(device)  # (B,) -1 = unknown
        with _autocast(device, bf16):
            out = net(wave, lengths)
        logits = out.logits.float()  # (B, 2)
        known = y >= 0
        if known.any():
            loss_sum += F.cross_entropy(logits[known], y[known], weight=class_weights, reduction="sum").item()
            weight_sum += float(class_weights[y[known]].sum())
        for u, s, lab in zip(batch["utt_ids"], logits[:, 1].tolist(), y.tolist()):
            scores[u] = s
            labels[u] = lab
    gathered = ctx.gather_objects((loss_sum, weight_sum, scores, labels))
    if ctx.distributed:
        loss_sum = sum(g[0] for g in gathered)
        weight_sum = sum(g[1] for g in gathered)
        scores, labels = {}, {}
        for g in gathered:
            scores.update(g[2])
            labels.update(g[3])
    loss = loss_sum / weight_sum if weight_sum > 0 else float("nan")
    return loss, scores, labels


# ----------------------------------------------------------------------------- training


def _prepare_utterances(cfg: Stage1Config, split: str) -> list[Utterance]:
    utts = build_split(cfg.data, split)
    if cfg.data.on_bad_audio == "skip":  # drop missing/empty files up front (cheap header check)
        utts, _ = scan_audio(utts, cfg.data.sample_rate, "skip")
    return utts


def _check_resumable(state: dict[str, Any], cfg: Stage1Config, state_path: Path) -> None:
    saved = state.get("model_config")
    if isinstance(saved, dict):  # a state written before a model field existed has its default
        try:
            saved = config_to_dict(config_from_dict(saved, ModelConfig, str(state_path)))
        except ConfigError:
            pass
    if saved is not None and saved != config_to_dict(cfg.model):
        raise ResumeError(
            f"{state_path} was written by a run with a different model architecture (model: section). "
            "Pass --no-resume (resume=False) to start over in this run directory, or use a new run directory."
        )


def train_stage1(
    cfg: Stage1Config,
    run_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
) -> Stage1Result:
    """Train the detector described by ``cfg`` into ``run_dir``.

    Args:
        cfg: the resolved Stage-1 config.
        run_dir: the run directory; products: ``stage1_detector.pth`` (average of the
            ``training.keep_best`` best epochs by dev loss), ``config_stage1.yaml``,
            ``logs/stage1_detector/`` (TensorBoard), ``checkpoints/stage1/`` (``epoch_NNN.pth``
            of the best epochs, ``best.json``, the resumable ``last.pth``).
        resume: continue from ``checkpoints/stage1/last.pth`` when it exists (finished epochs
            are not redone; an interrupted epoch restarts). ``False`` starts over and deletes
            the previous run's checkpoints in ``run_dir``.
        progress: show tqdm progress bars (rank 0 only).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (names the step and the last good state).
        ResumeError: ``last.pth`` belongs to another model architecture.
    """
    run_dir = Path(run_dir)
    tc = cfg.training
    ctx = start_run(tc.device, tc.seed, tc.num_threads)
    device = ctx.device
    ckpt_dir = run_dir / "checkpoints" / "stage1"
    state_path = ckpt_dir / STATE_NAME

    train_ds, sampler, train_loader = training_loader(cfg.data, tc, ctx, cfg.data.rawboost_algo)
    dev_utts = _prepare_utterances(cfg, "dev")
    dev_loader = _eval_loader(dev_utts, cfg, ctx, cfg.data.eval_crop_samples)

    model = build_detector(cfg.model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=tc.lr, weight_decay=tc.weight_decay)
    class_weights = torch.tensor(tc.class_weights, dtype=torch.float32, device=device)

    early = EarlyStopping(tc.patience)
    history: dict[str, list[float]] = {
        "train_loss": [], "dev_loss": [], "dev_eer": [], "epoch_seconds": [], "train_utts_per_s": []
    }
    start_epoch, global_step, elapsed = 0, 0, 0.0
    state = load_training_state(state_path) if resume else None
    if state is not None:
        _check_resumable(state, cfg, state_path)
        restored, start_epoch, global_step, elapsed = restore_loop_state(state, "model", model, optimizer, early)
        history.update(restored)
        log.info("resumed Stage 1 from %s after %d completed epochs", state_path, start_epoch)
    ctx.barrier()  # every rank has read the state before rank 0 touches the directory
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        best = BestCheckpoints(ckpt_dir, tc.keep_best)
        if state is None:
            if best.entries or state_path.is_file() or (run_dir / "stage1_detector.pth").is_file():
                log.warning("starting Stage 1 from scratch in %s: the previous run's checkpoints are replaced", run_dir)
            best.clear()
            state_path.unlink(missing_ok=True)
        else:
            best.drop_after(start_epoch)  # saved by an epoch that was interrupted before its state
        save_config(cfg, run_dir / "config_stage1.yaml")
    ctx.barrier()
    best = BestCheckpoints(ckpt_dir, tc.keep_best)

    steps_per_epoch = len(train_loader)
    if tc.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
    total_steps = tc.num_epochs * steps_per_epoch

    def lr_of(step: int) -> float:
        decay = None if tc.decay_epochs is None else tc.decay_epochs * steps_per_epoch
        return scheduled_lr(step, total_steps, tc.lr, tc.lr_schedule, tc.warmup_epochs * steps_per_epoch,
                            tc.min_lr_ratio, decay)

    train_model = wrap_ddp(model, ctx)
    writer = summary_writer(run_dir / "logs" / "stage1_detector", enabled=ctx.is_main, completed_steps=global_step)
    stopped_early = state is not None and bool(state.get("stopped", False))
    if stopped_early:
        log.info("the resumed run had already stopped early after epoch %d", start_epoch)
    try:
        for epoch in range(start_epoch, tc.num_epochs):
            if stopped_early:
                break
            t_epoch = time.perf_counter()
            train_model.train()
            train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            step_losses: list[float] = []
            n_utts = 0
            bar = tqdm(train_loader, desc=f"stage1 epoch {epoch + 1}/{tc.num_epochs}",
                       disable=not (progress and ctx.is_main), leave=False)
            for step, batch in enumerate(bar):
                if tc.max_steps_per_epoch is not None and step >= tc.max_steps_per_epoch:
                    break
                wave = batch["wave"].to(device, non_blocking=True)  # (B, L) fixed-length crops
                y = batch["labels"].to(device, non_blocking=True)  # (B,)
                with _autocast(device, tc.bf16):
                    out = train_model(wave)
                loss, global_loss = _weighted_ce(out.logits.float(), y, class_weights, ctx)
                check_finite(global_loss, global_step, "Stage 1", state_path)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    check_finite(grad_norm, global_step, "Stage 1 (gradient norm)", state_path)
                lr_now = lr_of(global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                optimizer.step()
                global_step += 1
                value = float(global_loss)
                step_losses.append(value)
                n_utts += len(y)
                writer.add_scalar("train/loss_step", value, global_step)
                writer.add_scalar("train/lr", lr_now, global_step)
                bar.set_postfix(loss=f"{value:.4f}")
            train_seconds = time.perf_counter() - t_epoch
            n_utts_all = round(ctx.all_reduce_mean(n_utts) * ctx.world_size)
            train_loss = float(np.mean(step_losses)) if step_losses else float("nan")
            scored = _dev_scored(epoch + 1, tc.num_epochs, tc.dev_last_epochs)
            if scored:
                dev_loss, dev_scores, dev_labels = evaluate_detector(
                    train_model, dev_loader, device, class_weights, ctx, tc.bf16, desc="dev", progress=progress
                )
                dev_eer = _eer_from(dev_scores, dev_labels)
            else:  # not scored (training.dev_last_epochs): NaN in the history
                dev_loss = dev_eer = float("nan")
            epoch_seconds = time.perf_counter() - t_epoch
            elapsed += epoch_seconds
            throughput = n_utts_all / max(train_seconds, 1e-9)
            for key, value in (("train_loss", train_loss), ("dev_loss", dev_loss), ("dev_eer", dev_eer),
                               ("epoch_seconds", epoch_seconds), ("train_utts_per_s", throughput)):
                history[key].append(float(value))
            writer.add_scalar("train/loss", train_loss, epoch + 1)
            if scored:
                writer.add_scalar("dev/loss", dev_loss, epoch + 1)
                writer.add_scalar("dev/eer", dev_eer, epoch + 1)
            writer.add_scalar("speed/train_utts_per_s", throughput, epoch + 1)
            writer.flush()
            dev_text = f"dev loss {dev_loss:.4f}, dev EER {100 * dev_eer:.2f}%" if scored else "dev not scored"
            log.info("epoch %d/%d: train loss %.4f, %s, %.1f s (%.0f utt/s training)",
                     epoch + 1, tc.num_epochs, train_loss, dev_text, epoch_seconds, throughput)
            if scored:  # patience counts scored epochs
                early.step(dev_loss)
            stopped_early = early.should_stop
            if ctx.is_main:
                # best first, then the state: a kill in between is repaired by drop_after on resume
                if scored:
                    best.consider(dev_loss, epoch + 1, model.state_dict())
                save_training_state(
                    state_path,
                    loop_state("model", model, optimizer, early, history, epoch + 1, global_step, elapsed,
                               stopped_early, model_config=config_to_dict(cfg.model), world_size=ctx.world_size),
                )
            ctx.barrier()
            if stopped_early:
                log.info("early stopping after epoch %d (no dev-loss improvement for %d epochs)", epoch + 1, tc.patience)
                break
    finally:
        writer.close()

    final = run_dir / "stage1_detector.pth"
    best = BestCheckpoints(ckpt_dir, tc.keep_best)  # every rank: the list rank 0 wrote
    best_epochs = [e["epoch"] for e in best.entries]
    epochs_completed = len(history["train_loss"])
    if ctx.is_main:
        if best.entries:
            model.load_state_dict(average_state_dicts(best.state_dicts()))
        else:
            log.warning("no epoch had a finite dev loss; %s holds the last weights, not an average", final)
        save_detector(
            model,
            final,
            extra={
                "averaged_epochs": best_epochs,
                "averaged_dev_losses": [float(e["loss"]) for e in best.entries],
                "train_seconds": elapsed,
                "epochs_completed": epochs_completed,
                "stopped_early": bool(stopped_early),
                "world_size": ctx.world_size,
                "global_batch": train_loader.batch_size * ctx.world_size,
            },
        )
        log.info("Stage 1: %d epochs, averaged epochs %s -> %s", epochs_completed, best_epochs, final)
    ctx.barrier()
    return Stage1Result(
        checkpoint=final,
        history=history,
        best_epochs=best_epochs,
        epochs_completed=epochs_completed,
        stopped_early=bool(stopped_early),
        train_seconds=elapsed,
    )


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_utterances(
    model: Detector,
    utts: Sequence[Utterance],
    cfg: Stage1Config,
    ctx: DistContext | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> dict[str, float]:
    """Score utterances (bona fide logit, ASVspoof convention), sharded across ranks under torchrun.

    Utterances are ordered by duration (little padding; the padding masks make a padded
    batch score like single utterances) and dealt round-robin to the ranks. Files longer than
    ``data.max_eval_seconds`` are scored in chunks of that length and the chunk scores
    averaged, weighted by chunk length, so a 10-minute file never needs a 10-minute forward
    pass. Every rank returns the merged dictionary.

    Args:
        model: the detector (its device is used).
        utts: the utterances to score.
        cfg: ``data`` (rates, crops, chunk length) and ``training.eval_batch_size``/``bf16``.
        ctx: the distributed context (``None``: single process).
        progress: show a progress bar (rank 0).
        desc: the progress bar's label.

    Returns:
        ``{utt_id: score}`` for every readable utterance.
    """
    device = next(model.parameters()).device
    ctx = ctx or DistContext(device=device)
    model.eval()
    chunk = int(cfg.data.max_eval_seconds * cfg.data.sample_rate)
    min_len = model.min_input_samples
    shard = ctx.shard(_by_length(utts))
    ds = EvalDataset(shard, sample_rate=cfg.data.sample_rate, crop_samples=cfg.data.eval_crop_samples,
                     on_bad_audio=cfg.data.on_bad_audio, min_samples=min_len)
    loader = DataLoader(ds, batch_size=cfg.training.eval_batch_size, shuffle=False, collate_fn=collate_padded,
                        num_workers=cfg.data.num_workers)
    scores: dict[str, float] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main)):
        if not batch["utt_ids"]:
            continue
        wave, lengths = batch["wave"], batch["lengths"]  # (B, L), (B,)
        if wave.shape[1] <= chunk:
            with _autocast(device, cfg.training.bf16):
                out = model(wave.to(device), lengths.to(device))
            for u, s in zip(batch["utt_ids"], out.logits[:, 1].float().tolist()):
                scores[u] = s
            continue
        for i, u in enumerate(batch["utt_ids"]):  # long files: chunk one by one
            x = wave[i, : int(lengths[i])]
            pieces = [x[s : s + chunk] for s in range(0, len(x), chunk)]
            pieces = [p for p in pieces if len(p) >= min_len] or [x]
            values, weights = [], []
            for p in pieces:
                with _autocast(device, cfg.training.bf16):
                    values.append(float(model(p[None].to(device)).logits[0, 1].float()))
                weights.append(len(p))
            scores[u] = float(np.average(values, weights=weights))
    if ctx.distributed:
        merged: dict[str, float] = {}
        for g in ctx.gather_objects(scores):
            merged.update(g)
        scores = merged
    return scores


# ----------------------------------------------------------------------------- evaluation report

#: The smoke-run overrides of both stages, plus a single kept checkpoint.
SMOKE_OVERRIDES = [*_COMMON_SMOKE, "training.keep_best=1"]


def stage1_config(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    batch_size: int | None = None,
    num_epochs: int | None = None,
    seed: int | None = None,
    smoke: bool = False,
) -> Stage1Config:
    """The Stage-1 config of notebook 01's parameters (``None``: the config file's value).

    The notebook run by hand and the pipeline call this with their parameters, so both
    paths resolve the same config (see :func:`xai_lib.config.notebook_config`).
    """
    return notebook_config(
        config_path, Stage1Config, overrides, data_root=data_root,
        settings={"training.batch_size": batch_size, "training.num_epochs": num_epochs, "training.seed": seed},
        final_overrides=SMOKE_OVERRIDES if smoke else (),
    )


def read_asv_scores(path: str | Path) -> dict[str, np.ndarray]:
    """Read an ASVspoof ASV score file (``SPEAKER ATTACK KEY SCORE``, KEY in target/nontarget/spoof)."""
    groups: dict[str, list[float]] = {"target": [], "nontarget": [], "spoof": []}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        key = next((p for p in parts if p in groups), None)
        try:
            score = float(parts[-1])
        except ValueError:
            key = None
        if key is None:
            raise ValueError(f"{path}:{n}: expected 'SPEAKER ATTACK target|nontarget|spoof SCORE', got {line!r}")
        groups[key].append(score)
    return {k: np.asarray(v) for k, v in groups.items()}


def store_score_threshold(detector: Detector, threshold: float, source: str = "dev EER") -> Path | None:
    """Keep the verdict threshold in the checkpoint the detector was loaded from.

    ``python -m xai_lib.explain`` calls an utterance spoof when its score (the bona fide
    logit, as in the score files) is below ``threshold``. The value is written into our
    format's ``extra`` as ``score_threshold`` (and ``score_threshold_source``), the file
    rewritten atomically, and ``detector.load_report.extra`` updated, so a later
    :func:`~xai_lib.detector.checkpoint.load_detector` returns it. A detector not loaded
    from our format (a published plain state dict, or built in memory) is left alone.

    Args:
        detector: the detector, as returned by ``load_detector``.
        threshold: the score threshold (e.g. the dev-EER operating point).
        source: how it was obtained.

    Returns:
        The rewritten file, or ``None`` when nothing was written.
    """
    report = getattr(detector, "load_report", None)
    if report is None or report.format != FORMAT_NAME or not Path(report.path).is_file():
        log.info("score threshold %.4f not stored: the detector was not loaded from an %s checkpoint", threshold, FORMAT_NAME)
        return None
    path = Path(report.path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        log.warning("score threshold not stored: %s is no longer an %s checkpoint", path, FORMAT_NAME)
        return None
    extra = dict(obj.get("extra") or {})
    wanted = {"score_threshold": float(threshold), "score_threshold_source": str(source)}
    report.extra.update(wanted)
    if all(extra.get(k) == v for k, v in wanted.items()):
        return path  # already there: the file (and its SHA-256, which Stage 2 records) stays as it is
    obj["extra"] = {**extra, **wanted}
    atomic_torch_save(obj, path)
    log.info("stored the verdict threshold %.4f (%s) in %s", threshold, source, path)
    return path


def stage1_report(
    detector: Detector,
    cfg: Stage1Config,
    run_dir: str | Path,
    history: dict[str, list[float]] | None = None,
    asv_score_file: str | None = None,
    splits: Sequence[str] = ("dev", "eval"),
    progress: bool = True,
) -> dict[str, Any]:
    """Score dev/eval, write ASVspoof score files, EERs (pooled and per attack) and figures.

    Products: ``run_dir/scores/{split}_scores.txt``, ``run_dir/figures/stage1_{split}_scores_det.png``,
    ``run_dir/figures/stage1_loss_curves.png``. Utterances without a key (label) are scored
    but left out of the metrics.

    Returns:
        The ``metrics.json["stage1"]`` values: ``{split}_eer``, ``{split}_threshold``,
        ``{split}_eer_per_attack`` (attack -> EER, plus ``pooled``), ``{split}_num_utts``,
        ``eval_min_tdcf`` when ``asv_score_file`` is given. EERs are fractions in [0, 1].
        The dev-EER threshold is also stored in the detector's checkpoint
        (:func:`store_score_threshold`): the verdict threshold of ``python -m xai_lib.explain``.
    """
    from xai_lib import plots
    from xai_lib.detector.metrics import compute_min_tdcf, eer_per_attack, write_score_file

    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    metrics: dict[str, Any] = {}
    for split in splits:
        protocol = getattr(cfg.data, f"{split}_protocol")
        if not protocol:
            continue
        utts = build_split(cfg.data, split)
        scores = score_utterances(detector, utts, cfg, progress=progress, desc=f"scoring {split}")
        order = [u.utt_id for u in utts if u.utt_id in scores]  # protocol order
        write_score_file(run_dir / "scores" / f"{split}_scores.txt", order, [scores[u] for u in order])
        labels = {u.utt_id: u.label for u in utts if u.label is not None and u.utt_id in scores}
        attacks = {u.utt_id: u.attack for u in utts}
        metrics[f"{split}_num_utts"] = len(scores)
        bona = np.array([scores[u] for u, lab in labels.items() if lab == 1])
        spoof = np.array([scores[u] for u, lab in labels.items() if lab == 0])
        if len(bona) == 0 or len(spoof) == 0:
            log.info("%s: no keys for both classes; scores written, no EER", split)
            continue
        eer, thr = utterance_eer(bona, spoof)
        metrics[f"{split}_eer"] = float(eer)
        metrics[f"{split}_threshold"] = float(thr)
        if split == "dev":
            store_score_threshold(detector, float(thr))
        per_attack = eer_per_attack({u: scores[u] for u in labels}, labels, attacks)
        metrics[f"{split}_eer_per_attack"] = {k: float(v) for k, v in per_attack.items()}
        fig, axes = plt_subplots(1, 2, figsize=(10, 3.6))
        plots.plot_score_histogram(bona, spoof, ax=axes[0], threshold=thr)
        axes[0].set_title(f"{split} scores (EER {100 * eer:.2f}%)")
        plots.plot_det_curve(bona, spoof, ax=axes[1])
        plots.save_figure(fig, fig_dir / f"stage1_{split}_scores_det.png")
        if split == "eval" and asv_score_file:
            asv = read_asv_scores(asv_score_file)
            metrics["eval_min_tdcf"] = float(
                compute_min_tdcf(bona, spoof, asv["target"], asv["nontarget"], asv["spoof"])
            )
    if history:
        curves = {k: v for k, v in history.items() if k.endswith("loss")}
        if any(len(v) for v in curves.values()):
            fig, ax = plt_subplots(1, 1, figsize=(6, 3.6))
            plots.plot_loss_curves(curves, ax=ax)
            plots.save_figure(fig, fig_dir / "stage1_loss_curves.png")
    return metrics


def plt_subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` without touching the global backend choice."""
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)

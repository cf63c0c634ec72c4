"""Stage 1: train the SSL + Conformer-TCM detector (DESIGN §3).

Weighted cross-entropy (spoof 0.1, bona fide 0.9), Adam/AdamW, RawBoost on the fly,
early stopping on the dev loss, the N best epochs averaged into ``stage1_detector.pth``,
resumable after an interruption, TensorBoard scalars under ``run_dir/logs/stage1_detector``.
Runs single-process or, unchanged, under ``torchrun`` (DistributedDataParallel).
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ..config import Stage1Config, save_config
from ..data.datasets import EvalDataset, TrainDataset, build_split, collate_padded
from ..data.protocols import Utterance
from ..metrics import compute_eer
from ..models.checkpoint import atomic_torch_save, average_state_dicts, save_detector
from ..models.detector import Detector
from .common import (
    BestCheckpoints,
    DistContext,
    EarlyStopping,
    check_finite,
    init_distributed,
    load_training_state,
    seed_everything,
    summary_writer,
)

__all__ = ["Stage1Result", "train_stage1", "score_utterances", "evaluate_detector"]

log = logging.getLogger(__name__)

STATE_NAME = "last.pth"


@dataclass
class Stage1Result:
    """What a Stage-1 training run produced."""

    checkpoint: Path  # run_dir/stage1_detector.pth (averaged N best)
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch: train_loss, dev_loss, dev_eer
    best_epochs: list[int] = field(default_factory=list)
    epochs_completed: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0


def _weighted_ce(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Class-weighted cross-entropy normalised by the GLOBAL batch weight.

    ``F.cross_entropy(weight=...)`` divides by the weight sum of the local batch; under DDP
    (which averages gradients over ranks) that would differ from one process seeing the
    whole batch. Dividing by the all-reduced weight sum (times the world size, undone by
    DDP's averaging) makes N ranks compute exactly the single-process gradient.
    """
    per_utt = F.cross_entropy(logits, y, weight=weights, reduction="none")  # (B,) = w_y * nll
    wsum = weights[y].sum().detach()
    if ctx.distributed:
        wsum = ctx.all_reduce_sum(wsum.clone()) / ctx.world_size
    return per_utt.sum() / wsum


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _unwrap(model: torch.nn.Module) -> Detector:
    return model.module if isinstance(model, DDP) else model  # type: ignore[return-value]


@torch.no_grad()
def evaluate_detector(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    class_weights: torch.Tensor,
    ctx: DistContext | None = None,
    bf16: bool = False,
    desc: str = "dev",
) -> tuple[float, dict[str, float], dict[str, int]]:
    """Weighted-CE loss and scores over ``loader`` (merged across ranks).

    Returns:
        (mean loss, {utt: score}, {utt: label}); score = bona fide logit.
    """
    ctx = ctx or DistContext(device=device)
    model.eval()
    loss_sum, count = 0.0, 0
    scores: dict[str, float] = {}
    labels: dict[str, int] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not ctx.is_main):
        wave = batch["wave"].to(device)
        lengths = batch["lengths"].to(device)
        y = batch["labels"].to(device)
        with _autocast(device, bf16):
            out = _unwrap(model)(wave, lengths)
        logits = out.logits.float()
        known = y >= 0
        if known.any():
            loss_sum += F.cross_entropy(logits[known], y[known], weight=class_weights, reduction="sum").item()
            count += int(known.sum())
        for u, s, lab in zip(batch["utt_ids"], logits[:, 1].tolist(), y.tolist()):
            scores[u] = s
            labels[u] = lab
    if ctx.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (loss_sum, count, scores, labels))
        loss_sum = sum(g[0] for g in gathered)
        count = sum(g[1] for g in gathered)
        scores, labels = {}, {}
        for g in gathered:
            scores.update(g[2])
            labels.update(g[3])
    return (loss_sum / max(count, 1)), scores, labels


def _eer_from(scores: dict[str, float], labels: dict[str, int]) -> float:
    bona = np.array([s for u, s in scores.items() if labels.get(u) == 1])
    spoof = np.array([s for u, s in scores.items() if labels.get(u) == 0])
    if len(bona) == 0 or len(spoof) == 0:
        return float("nan")
    return float(compute_eer(bona, spoof)[0])


def _eval_loader(utts: Sequence[Utterance], cfg: Stage1Config, ctx: DistContext, crop: int | None) -> DataLoader:
    ds = EvalDataset(
        list(utts),
        sample_rate=cfg.data.sample_rate,
        crop_samples=crop,
        on_bad_audio=cfg.data.on_bad_audio,
    )
    sampler = DistributedSampler(ds, shuffle=False, drop_last=False) if ctx.distributed else None
    return DataLoader(
        ds,
        batch_size=cfg.training.eval_batch_size,
        shuffle=False,
        sampler=sampler,
        collate_fn=collate_padded,
        num_workers=cfg.data.num_workers,
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
        run_dir: the run directory; products: ``stage1_detector.pth``, ``config_stage1.yaml``,
            ``logs/stage1_detector/`` (TensorBoard), ``checkpoints/stage1/`` (N best + resumable state).
        resume: continue from ``checkpoints/stage1/last.pth`` when it exists.
        progress: show tqdm progress bars.
    """
    run_dir = Path(run_dir)
    ctx = init_distributed(cfg.training.device)
    tc = cfg.training
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    device = ctx.device
    ckpt_dir = run_dir / "checkpoints" / "stage1"
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config_stage1.yaml")

    train_utts = build_split(cfg.data, "train")
    dev_utts = build_split(cfg.data, "dev")
    train_ds = TrainDataset(
        train_utts,
        crop_samples=cfg.data.crop_samples,
        sample_rate=cfg.data.sample_rate,
        rawboost_algo=cfg.data.rawboost_algo,
        seed=tc.seed,
        on_bad_audio=cfg.data.on_bad_audio,
    )
    per_rank_batch = max(1, tc.batch_size // ctx.world_size)
    # One sampler for both cases: single-process is the 1-replica case, so that a run on N
    # ranks sees, step by step, the same utterances as one process with the same global batch.
    sampler = DistributedSampler(
        train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=tc.seed, drop_last=False
    )
    train_loader = DataLoader(
        train_ds,
        batch_size=per_rank_batch,
        sampler=sampler,
        collate_fn=collate_padded,
        num_workers=cfg.data.num_workers,
        drop_last=False,
    )
    dev_loader = _eval_loader(dev_utts, cfg, ctx, cfg.data.eval_crop_samples)

    model = Detector(cfg.model).to(device)
    if cfg.model.ssl.freeze:
        for p in model.ssl_model.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=tc.lr, weight_decay=tc.weight_decay)
    class_weights = torch.tensor(tc.class_weights, dtype=torch.float32, device=device)

    early = EarlyStopping(tc.patience)
    best = BestCheckpoints(ckpt_dir, tc.keep_best)
    history: dict[str, list[float]] = {"train_loss": [], "dev_loss": [], "dev_eer": []}
    start_epoch, global_step, elapsed = 0, 0, 0.0
    state_path = ckpt_dir / STATE_NAME
    state = load_training_state(state_path) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        early.load_state_dict(state["early"])
        history = {k: list(v) for k, v in state["history"].items()}
        start_epoch, global_step, elapsed = int(state["epoch"]), int(state["global_step"]), float(state["elapsed"])
        torch.set_rng_state(state["rng"])
        log.info("resumed Stage 1 from %s after %d completed epochs", state_path, start_epoch)

    train_model: torch.nn.Module = model
    if ctx.distributed:
        if device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm needs CUDA)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = summary_writer(run_dir / "logs" / "stage1_detector", enabled=ctx.is_main)
    stopped_early = state is not None and bool(state.get("stopped", False))
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, tc.num_epochs):
            if stopped_early:
                break
            t0 = time.perf_counter()
            train_model.train()
            train_ds.set_epoch(epoch)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            loss_sum, n_seen = 0.0, 0
            bar = tqdm(train_loader, desc=f"stage1 epoch {epoch + 1}/{tc.num_epochs}", disable=not (progress and ctx.is_main))
            for step, batch in enumerate(bar):
                if tc.max_steps_per_epoch is not None and step >= tc.max_steps_per_epoch:
                    break
                wave = batch["wave"].to(device)  # (B, L) fixed-length crops
                y = batch["labels"].to(device)
                with _autocast(device, tc.bf16):
                    out = train_model(wave)
                loss = _weighted_ce(out.logits.float(), y, class_weights, ctx)
                check_finite(loss, global_step, "Stage 1")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                optimizer.step()
                global_step += 1
                loss_sum += loss.item() * len(y)
                n_seen += len(y)
                writer.add_scalar("train/loss_step", loss.item(), global_step)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            train_loss = ctx.all_reduce_mean(loss_sum / max(n_seen, 1))
            dev_loss, dev_scores, dev_labels = evaluate_detector(
                train_model, dev_loader, device, class_weights, ctx, tc.bf16, desc="dev"
            )
            dev_eer = _eer_from(dev_scores, dev_labels)
            elapsed += time.perf_counter() - t0
            history["train_loss"].append(train_loss)
            history["dev_loss"].append(dev_loss)
            history["dev_eer"].append(dev_eer)
            writer.add_scalar("train/loss", train_loss, epoch + 1)
            writer.add_scalar("dev/loss", dev_loss, epoch + 1)
            writer.add_scalar("dev/eer", dev_eer, epoch + 1)
            writer.flush()
            log.info("epoch %d: train %.4f dev %.4f dev EER %.2f%%", epoch + 1, train_loss, dev_loss, 100 * dev_eer)
            early.step(dev_loss)
            stopped_early = early.should_stop
            if ctx.is_main:
                best.consider(dev_loss, epoch + 1, model.state_dict())
                atomic_torch_save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "early": early.state_dict(),
                        "history": history,
                        "epoch": epoch + 1,
                        "global_step": global_step,
                        "elapsed": elapsed,
                        "rng": torch.get_rng_state(),
                        "stopped": stopped_early,
                    },
                    state_path,
                )
            ctx.barrier()
            if stopped_early:
                log.info("early stopping after epoch %d (no dev-loss improvement for %d epochs)", epoch + 1, tc.patience)
                break
    finally:
        writer.close()

    final = run_dir / "stage1_detector.pth"
    if ctx.is_main:
        best = BestCheckpoints(ckpt_dir, tc.keep_best)
        averaged = average_state_dicts(best.state_dicts()) if best.entries else model.state_dict()
        model.load_state_dict(averaged)
        save_detector(
            model,
            final,
            extra={
                "averaged_epochs": [e["epoch"] for e in best.entries],
                "train_seconds": elapsed,
                "epochs_completed": len(history["train_loss"]),
            },
        )
    ctx.barrier()
    return Stage1Result(
        checkpoint=final,
        history=history,
        best_epochs=[e["epoch"] for e in best.entries],
        epochs_completed=len(history["train_loss"]),
        stopped_early=stopped_early,
        train_seconds=elapsed,
    )


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

    Files longer than ``data.max_eval_seconds`` are scored in chunks of that length and the
    chunk scores averaged, so a 10-minute file never needs a 10-minute forward pass.
    Every rank returns the merged dictionary.
    """
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    device = next(model.parameters()).device
    model.eval()
    chunk = int(cfg.data.max_eval_seconds * cfg.data.sample_rate)
    shard = list(utts)[ctx.rank :: ctx.world_size]
    ds = EvalDataset(shard, sample_rate=cfg.data.sample_rate, crop_samples=cfg.data.eval_crop_samples, on_bad_audio=cfg.data.on_bad_audio)
    loader = DataLoader(ds, batch_size=cfg.training.eval_batch_size, shuffle=False, collate_fn=collate_padded, num_workers=cfg.data.num_workers)
    scores: dict[str, float] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main)):
        wave, lengths = batch["wave"], batch["lengths"]
        if wave.shape[1] <= chunk:
            with _autocast(device, cfg.training.bf16):
                out = model(wave.to(device), lengths.to(device))
            for u, s in zip(batch["utt_ids"], out.logits[:, 1].float().tolist()):
                scores[u] = s
            continue
        for i, u in enumerate(batch["utt_ids"]):  # long files: chunk one by one
            x = wave[i, : int(lengths[i])]
            pieces = [x[s : s + chunk] for s in range(0, len(x), chunk)]
            pieces = [p for p in pieces if len(p) >= 400] or [x]
            chunk_scores = []
            for p in pieces:
                with _autocast(device, cfg.training.bf16):
                    chunk_scores.append(float(model(p[None].to(device)).logits[0, 1].float()))
            scores[u] = float(np.mean(chunk_scores))
    if ctx.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, scores)
        scores = {}
        for g in gathered:
            scores.update(g)
    return scores


# ----------------------------------------------------------------------------- evaluation report

SMOKE_OVERRIDES = [
    "training.num_epochs=1",
    "training.max_steps_per_epoch=2",
    "training.batch_size=4",
    "training.eval_batch_size=4",
    "training.keep_best=1",
    "data.max_train_utts=16",
    "data.max_eval_utts=8",
    "data.crop_samples=8000",
]


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

    Products: ``run_dir/scores/{split}_scores.txt``, ``run_dir/figures/stage1_*.png``.
    Returns the ``metrics.json["stage1"]`` values (EERs as fractions in [0, 1]).
    """
    from .. import plots
    from ..metrics import compute_min_tdcf, eer_per_attack, write_score_file

    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    metrics: dict[str, Any] = {}
    for split in splits:
        protocol = getattr(cfg.data, f"{split}_protocol")
        if not protocol:
            continue
        utts = build_split(cfg.data, split)
        scores = score_utterances(detector, utts, cfg, progress=progress, desc=f"scoring {split}")
        write_score_file(run_dir / "scores" / f"{split}_scores.txt", list(scores), list(scores.values()))
        labels = {u.utt_id: u.label for u in utts}
        attacks = {u.utt_id: u.attack for u in utts}
        bona = np.array([s for u, s in scores.items() if labels[u] == 1])
        spoof = np.array([s for u, s in scores.items() if labels[u] == 0])
        if len(bona) == 0 or len(spoof) == 0:
            continue
        eer, thr = compute_eer(bona, spoof)
        metrics[f"{split}_eer"] = float(eer)
        metrics[f"{split}_threshold"] = float(thr)
        per_attack = eer_per_attack(scores, labels, attacks)
        metrics[f"{split}_eer_per_attack"] = {k: float(v) for k, v in per_attack.items()}
        metrics[f"{split}_num_utts"] = len(scores)
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
        fig, ax = plt_subplots(1, 1, figsize=(6, 3.6))
        plots.plot_loss_curves({k: v for k, v in history.items() if k.endswith("loss")}, ax=ax)
        plots.save_figure(fig, fig_dir / "stage1_loss_curves.png")
    return metrics


def plt_subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` without touching the global backend choice."""
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)

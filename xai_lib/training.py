"""Pieces shared by the Stage-1 and Stage-2 training loops.

Seeding, device choice, single-process / torchrun (DistributedDataParallel) context,
early stopping, the N-best checkpoint keeper, resumable training state (with every RNG),
NaN guards, TensorBoard and ``metrics.json``. The same loop runs single-process and under
``torchrun --nproc_per_node N``: the :class:`DistContext` tells it its rank, and only
rank 0 logs and writes checkpoints.

Under torchrun, :func:`wrap_ddp` makes N ranks compute the gradient of one process that
sees the whole (global) batch: CUDA BatchNorms become ``torch.nn.SyncBatchNorm`` and, on
CPU (gloo), :class:`GlooSyncBatchNorm` computes the training statistics over all ranks.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from xai_lib.cpu import keep_freed_memory
from xai_lib.files import atomic_torch_save, atomic_write_text, safe_torch_load

__all__ = [
    "NonFiniteLossError",
    "ResumeError",
    "DistContext",
    "init_distributed",
    "seed_everything",
    "resolve_device",
    "EarlyStopping",
    "BestCheckpoints",
    "GlooSyncBatchNorm",
    "convert_sync_batchnorm",
    "wrap_ddp",
    "check_finite",
    "rng_state",
    "set_rng_state",
    "save_training_state",
    "load_training_state",
    "start_run",
    "loop_state",
    "restore_loop_state",
    "summary_writer",
]

log = logging.getLogger(__name__)

#: Overrides that make either stage a seconds-long smoke run (appended last, so they win).
SMOKE_OVERRIDES = [
    "training.num_epochs=1",
    "training.max_steps_per_epoch=2",
    "training.batch_size=4",
    "training.eval_batch_size=4",
    "data.max_train_utts=16",
    "data.max_eval_utts=8",
    "data.crop_samples=8000",
]

T = TypeVar("T")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


class ResumeError(RuntimeError):
    """A resumable state in the run directory does not fit the run being started."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; otherwise ``torch.device(spec)``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training.device={spec!r} but CUDA is not available; use device: auto or cpu")
    return dev


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Every collective helper below is the identity when ``world_size == 1``, so a loop
    written against a ``DistContext`` runs unchanged with or without torchrun.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live: the CUDA device under NCCL, else the CPU (gloo)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a Python float over ranks (identity single-process)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks in place (identity single-process); returns it."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one rank."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm_device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (``items[rank::world_size]``: no padding, no duplicates)."""
        return list(items)[self.rank :: self.world_size]

    def gather_objects(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` single-process)."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun, else a single-process context.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) this initialises the default
    process group once (later calls reuse it): NCCL when the device is CUDA, gloo on CPU.
    Each rank uses ``cuda:LOCAL_RANK`` on GPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device_spec))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of every rank, on any backend.

    ``torch.nn.SyncBatchNorm`` only runs on GPUs. This module does the same on CPU (gloo):
    in training under an initialised process group it all-reduces per-channel
    ``(sum, sum of squares, count)`` (float64, one differentiable collective per call), so N
    ranks normalise with exactly the statistics one process would compute over the whole
    batch, and gradients flow back through the statistics to every rank. In ``eval()`` or
    single-process it is a plain BatchNorm (no collective: ranks may score different counts
    of batches). Parameters and buffers have the usual names, so state dicts are unchanged.

    Input: (B, C, ...) as BatchNorm1d/2d/3d.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (B, C, ...), got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        self._check_input_dim(x)
        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() // C])])  # (2C + 1,)
        total = differentiable_all_reduce(local)  # summed over ranks
        count = total[-1]
        mean = total[:C] / count  # (C,)
        var = (total[C : 2 * C] / count - mean * mean).clamp_min(0.0)  # biased, as F.batch_norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var.view(shape).to(x.dtype) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of ``model`` by its cross-rank version (same parameters and buffers).

    CUDA: ``torch.nn.SyncBatchNorm``; otherwise :class:`GlooSyncBatchNorm`. Modules are
    swapped in place on their parents (so code that reaches them as ``model.first_bn`` or
    ``net[5]`` sees the new ones); the parameter objects are kept, so an optimizer built
    before the conversion still updates them. Returns the (possibly new) root module.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(
            model.num_features, eps=model.eps, momentum=model.momentum, affine=model.affine,
            track_running_stats=model.track_running_stats,
        )
        if model.affine:
            new.weight, new.bias = model.weight, model.bias
        if model.track_running_stats:
            new.running_mean, new.running_var = model.running_mean, model.running_var
            new.num_batches_tracked = model.num_batches_tracked
        new.train(model.training)
        return new
    for name, child in list(model.named_children()):
        new_child = convert_sync_batchnorm(child, device)
        if new_child is not child:
            setattr(model, name, new_child)
    return model


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module to train: ``model`` itself single-process, else DDP with global-batch BatchNorm.

    Under torchrun the BatchNorms of ``model`` are converted in place
    (:func:`convert_sync_batchnorm`) and the model is wrapped in
    ``DistributedDataParallel``; keep using ``model`` itself for ``state_dict()`` and
    evaluation. Together with a loss normalised by the global batch (see
    ``stage1._weighted_ce``), N ranks then take exactly the optimisation step of one
    process with the same global batch (up to floating-point summation order).

    Note: BatchNorm statistics are synchronised only where a module's own ``forward`` runs;
    the detector's padding-masked BatchNorm path (variable-length batches in training)
    computes per-rank statistics. Stage-1 training uses fixed-length crops, so it is exact.
    """
    if not ctx.distributed:
        return model
    converted = convert_sync_batchnorm(model, ctx.device)
    if converted is not model:
        raise TypeError("wrap_ddp: the root module itself is a BatchNorm; wrap it in a container first")
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


# ----------------------------------------------------------------------------- early stopping, checkpoints


class EarlyStopping:
    """Stop when the monitored value (lower is better) has not improved for ``patience`` epochs."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, value: float) -> bool:
        """Record ``value``; return True when it is a new best. NaN never improves."""
        if value < self.best - self.min_delta:
            self.best = value
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])


class BestCheckpoints:
    """Keep the ``keep`` best model weights (by dev loss) on disk, for averaging at the end.

    Files are ``<dir>/epoch_<E>.pth`` holding a plain state dict, written atomically; an
    index ``<dir>/best.json`` lists (loss, epoch, file) so that a resumed run continues it.
    Ties keep the earlier epoch.
    """

    INDEX = "best.json"

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.dir = Path(directory)
        self.keep = keep
        self.entries: list[dict[str, Any]] = []
        index = self.dir / self.INDEX
        if index.is_file():
            try:
                entries = json.loads(index.read_text())
            except json.JSONDecodeError:
                log.warning("%s is not valid JSON; starting a new best-checkpoint list", index)
                entries = []
            self.entries = [e for e in entries if (self.dir / e["file"]).is_file()][: self.keep]

    def consider(self, loss: float, epoch: int, state_dict: dict[str, Tensor]) -> bool:
        """Save ``state_dict`` if it ranks among the best ``keep``; return whether it was kept.

        A non-finite ``loss`` is never kept. Re-considering an epoch already listed (a resumed
        run redoing it) replaces that entry.
        """
        if not math.isfinite(loss):
            return False
        ranked = sorted((e for e in self.entries if e["epoch"] != epoch), key=lambda e: (e["loss"], e["epoch"]))
        if len(ranked) >= self.keep and loss >= ranked[-1]["loss"]:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch:03d}.pth"
        atomic_torch_save({k: v.detach().cpu() for k, v in state_dict.items()}, self.dir / name)
        ranked.append({"loss": float(loss), "epoch": int(epoch), "file": name})
        ranked.sort(key=lambda e: (e["loss"], e["epoch"]))
        for dropped in ranked[self.keep :]:
            (self.dir / dropped["file"]).unlink(missing_ok=True)
        self.entries = ranked[: self.keep]
        self._write_index()
        return True

    def drop_after(self, epoch: int) -> None:
        """Forget (and delete) entries of epochs after ``epoch``: a resumed run redoes them."""
        stale = [e for e in self.entries if e["epoch"] > epoch]
        if not stale:
            return
        for e in stale:
            (self.dir / e["file"]).unlink(missing_ok=True)
        self.entries = [e for e in self.entries if e["epoch"] <= epoch]
        self._write_index()

    def clear(self) -> None:
        """Delete every kept checkpoint and the index (a fresh run in a used directory)."""
        for path in self.dir.glob("epoch_*.pth"):
            path.unlink(missing_ok=True)
        (self.dir / self.INDEX).unlink(missing_ok=True)
        self.entries = []

    def state_dicts(self) -> list[dict[str, Tensor]]:
        return [safe_torch_load(self.dir / e["file"], map_location="cpu") for e in self.entries]

    def _write_index(self) -> None:
        atomic_write_text(self.dir / self.INDEX, json.dumps(self.entries, indent=1))


def check_finite(loss: Tensor, step: int, stage: str, last_good: str | Path | None = None, ctx: DistContext | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the step when ``loss`` is NaN/inf.

    Args:
        loss: the step's loss (any shape).
        step: global step (0-based count of optimizer steps taken so far).
        stage: "Stage 1" / "Stage 2", for the message.
        last_good: the last good resumable checkpoint, named in the message (``None``: none yet).
        ctx: under torchrun, every rank raises when any rank's loss is non-finite (one
            collective), so no rank is left waiting in the backward all-reduce.
    """
    bad = not bool(torch.isfinite(loss.detach()).all())
    if ctx is not None and ctx.distributed:
        bad = ctx.any(bad)
    if not bad:
        return
    value = loss.detach().float().flatten()[0].item() if loss.numel() else float("nan")
    if last_good is not None and Path(last_good).is_file():
        where = f"the last good checkpoint is {last_good} (resume from it with a lower learning rate)"
    else:
        where = "no epoch had finished, so there is no checkpoint to resume from"
    raise NonFiniteLossError(
        f"{stage}: the loss became {value} at global step {step}; training stopped and {where}. "
        "Lower training.lr, set training.grad_clip, or check the input audio."
    )


# ----------------------------------------------------------------------------- resumable state


def rng_state() -> dict[str, Any]:
    """Every RNG a training loop may touch (torch CPU/CUDA, NumPy, Python), as tensors and primitives.

    The result can be saved with ``torch.save`` and read back with ``weights_only=True``.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": [int(v) for v in py_state[1]],
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (older states holding only a torch tensor work too)."""
    if isinstance(state, Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a resumable training state atomically (a SIGKILL never leaves half a file)."""
    return atomic_torch_save(state, path)


def load_training_state(path: Path) -> dict[str, Any] | None:
    """Load a resumable training state written with ``atomic_torch_save`` (or None if absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    return safe_torch_load(path, map_location="cpu")


def start_run(device: str, seed: int, num_threads: int | None) -> DistContext:
    """The first steps of every training loop: join torchrun's process group (or not), set the
    CPU threads when asked, keep freed memory for reuse (:func:`xai_lib.cpu.keep_freed_memory`), seed
    every RNG. Returns this process's :class:`DistContext`."""
    keep_freed_memory()
    ctx = init_distributed(device)
    if num_threads:
        torch.set_num_threads(num_threads)
    seed_everything(seed)
    return ctx


def loop_state(
    module_key: str,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    early: EarlyStopping,
    history: dict[str, list[float]],
    epoch: int,
    global_step: int,
    elapsed: float,
    stopped: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The resumable state both loops write after each epoch (``extra``: each stage's own keys);
    :func:`restore_loop_state` reads it back."""
    return {
        module_key: module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "early": early.state_dict(),
        "history": history,
        "epoch": epoch,
        "global_step": global_step,
        "elapsed": elapsed,
        "rng": rng_state(),
        "stopped": stopped,
        **extra,
    }


def restore_loop_state(
    state: dict[str, Any], module_key: str, module: nn.Module, optimizer: torch.optim.Optimizer, early: EarlyStopping
) -> tuple[dict[str, list[float]], int, int, float]:
    """Load what :func:`loop_state` wrote into ``module``, ``optimizer``, ``early`` and the RNGs.

    Returns:
        ``(history, epochs completed, global step, elapsed training seconds)``.
    """
    module.load_state_dict(state[module_key])
    optimizer.load_state_dict(state["optimizer"])
    early.load_state_dict(state["early"])
    set_rng_state(state["rng"])
    history = {k: list(v) for k, v in state["history"].items()}
    return history, int(state["epoch"]), int(state["global_step"]), float(state["elapsed"])


# ----------------------------------------------------------------------------- logging


def summary_writer(log_dir: Path, enabled: bool = True, completed_steps: int = 0):
    """A TensorBoard ``SummaryWriter`` on rank 0, or a no-op stand-in elsewhere.

    ``completed_steps``: optimiser steps already done (0 for a fresh start). Events after
    them, left by an interrupted or earlier run in the same directory, are hidden, so
    curves never show redone steps twice.
    """
    if enabled:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir), purge_step=completed_steps + 1)

    class _Null:
        def add_scalar(self, *a, **k) -> None: ...
        def add_scalars(self, *a, **k) -> None: ...
        def flush(self) -> None: ...
        def close(self) -> None: ...

    return _Null()


def training_loader(
    data: Any, training: Any, ctx: DistContext, rawboost_algo: int
) -> tuple[Any, DistributedSampler, DataLoader]:
    """The training set, its sampler and loader, the same for both stages.

    Random crops of ``data.crop_samples`` (seeded by ``training.seed``, the epoch and the
    index), optional RawBoost and splice augmentation, one :class:`DistributedSampler` for
    both cases: a single process is the 1-replica case, so a run on N ranks sees, step by
    step, the utterances of one process with the same global batch.

    Args:
        data: the ``data`` config section; ``training``: the ``training`` section.
        ctx: the process group.
        rawboost_algo: RawBoost algorithm (0 = none; Stage 2 explains clean input).

    Returns:
        ``(dataset, sampler, loader)``; call ``dataset.set_epoch`` and ``sampler.set_epoch``
        every epoch.
    """
    from xai_lib.data.datasets import TrainDataset, build_split, collate_padded, scan_audio

    utts = build_split(data, "train")
    if data.on_bad_audio == "skip":  # drop missing/empty files up front (cheap header check)
        utts, _ = scan_audio(utts, data.sample_rate, "skip")
    dataset = TrainDataset(
        utts, crop_samples=data.crop_samples, sample_rate=data.sample_rate, rawboost_algo=rawboost_algo,
        seed=training.seed, on_bad_audio=data.on_bad_audio, splice_prob=data.splice_prob,
        splice_min_samples=int(round(data.splice_min_s * data.sample_rate)),
        splice_max_fraction=data.splice_max_fraction, cache_mb=data.cache_audio_mb,
    )
    if training.batch_size % ctx.world_size:
        log.warning("training.batch_size=%d is not a multiple of the %d processes; the global batch is %d",
                    training.batch_size, ctx.world_size, max(1, training.batch_size // ctx.world_size) * ctx.world_size)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=training.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=max(1, training.batch_size // ctx.world_size), sampler=sampler,
                        collate_fn=collate_padded, num_workers=data.num_workers, drop_last=False,
                        pin_memory=ctx.device.type == "cuda")
    return dataset, sampler, loader

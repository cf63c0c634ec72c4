"""Pieces shared by the Stage-1 and Stage-2 training loops.

Seeding, device choice, single-process / torchrun (DistributedDataParallel) context,
early stopping, the N-best checkpoint keeper, resumable training state and NaN guards.
The same loop runs single-process and under ``torchrun --nproc_per_node N``: the
:class:`DistContext` tells it its rank, and only rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..models.checkpoint import atomic_torch_save

__all__ = [
    "NonFiniteLossError",
    "DistContext",
    "init_distributed",
    "seed_everything",
    "resolve_device",
    "EarlyStopping",
    "BestCheckpoints",
    "check_finite",
    "load_training_state",
    "summary_writer",
    "merge_metrics",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


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


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

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

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a Python float over ranks (identity single-process)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun, else a single-process context.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) this initialises the default
    process group: NCCL when the device is CUDA, gloo on CPU. Each rank uses
    ``cuda:LOCAL_RANK`` on GPUs.
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


class EarlyStopping:
    """Stop when the monitored value (lower is better) has not improved for ``patience`` epochs."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, value: float) -> bool:
        """Record ``value``; return True when it is a new best."""
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
    """

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.dir = Path(directory)
        self.keep = keep
        self.entries: list[dict[str, Any]] = []
        index = self.dir / "best.json"
        if index.is_file():
            self.entries = [e for e in json.loads(index.read_text()) if (self.dir / e["file"]).is_file()]

    def consider(self, loss: float, epoch: int, state_dict: dict[str, torch.Tensor]) -> bool:
        """Save ``state_dict`` if it ranks among the best ``keep``; return whether it was kept."""
        ranked = sorted(self.entries, key=lambda e: e["loss"])
        if len(ranked) >= self.keep and loss >= ranked[-1]["loss"]:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch:03d}.pth"
        atomic_torch_save({k: v.detach().cpu() for k, v in state_dict.items()}, self.dir / name)
        ranked.append({"loss": float(loss), "epoch": int(epoch), "file": name})
        ranked.sort(key=lambda e: e["loss"])
        for dropped in ranked[self.keep :]:
            (self.dir / dropped["file"]).unlink(missing_ok=True)
        self.entries = ranked[: self.keep]
        tmp = self.dir / "best.json.tmp"
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.dir / "best.json")
        return True

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [torch.load(self.dir / e["file"], map_location="cpu", weights_only=True) for e in self.entries]


def check_finite(loss: torch.Tensor, step: int, stage: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the step when ``loss`` is NaN/inf."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"{stage}: the loss became {loss.item()} at global step {step}. Training stopped; the last good "
            "checkpoint was kept. Lower the learning rate, enable training.grad_clip, or check the input audio."
        )


def load_training_state(path: Path) -> dict[str, Any] | None:
    """Load a resumable training state written with ``atomic_torch_save`` (or None if absent)."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def summary_writer(log_dir: Path, enabled: bool = True):
    """A TensorBoard ``SummaryWriter`` on rank 0, or a no-op stand-in elsewhere."""
    if enabled:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir))

    class _Null:
        def add_scalar(self, *a, **k) -> None: ...
        def add_scalars(self, *a, **k) -> None: ...
        def flush(self) -> None: ...
        def close(self) -> None: ...

    return _Null()


def merge_metrics(run_dir: str | Path, key: str, values: dict[str, Any]) -> Path:
    """Merge ``{key: values}`` into ``run_dir/metrics.json`` atomically (other stages' keys kept)."""
    path = Path(run_dir) / "metrics.json"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("metrics.json in %s was not valid JSON; starting a new one", run_dir)
    data[key] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".metrics.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

"""Files that are written whole or not at all, and checkpoints that never run code.

* :func:`atomic_write` (and :func:`atomic_write_text`, :func:`atomic_torch_save`): every
  product of a run is written to a temporary file and moved over its target, so a crash
  never leaves half a checkpoint, config or ``metrics.json``.
* :func:`safe_torch_load`: ``torch.load(weights_only=True)`` with one clear error; a file
  that would need arbitrary unpickling is refused and never executed.
* :func:`to_primitive`: what a ``weights_only`` checkpoint may hold beside tensors.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "atomic_torch_save",
    "safe_torch_load",
    "to_primitive",
    "file_sha256",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unsafe, unreadable or does not match the model."""


def _remove_stale_temporaries(path: Path, min_age_s: float = 60.0) -> None:
    """Delete ``.NAME.PID.*.tmp`` files next to ``path`` left by a killed writer (SIGKILL, power loss):
    their process no longer exists on this machine and they are older than ``min_age_s``."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if not parts or not parts[0].isdigit():
            continue
        try:
            os.kill(int(parts[0]), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue  # alive under another user, or not a pid: leave it
        try:
            if time.time() - tmp.stat().st_mtime >= min_age_s:
                tmp.unlink()
                logger.info("removed %s, left by an interrupted save", tmp)
        except OSError:
            pass


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` that never leaves a half-written file at ``path``.

    Writes to a temporary file in the same directory, flushes and fsyncs it, then
    ``os.replace``-s it over ``path``. If anything fails, ``path`` keeps its previous
    content (or stays absent) and the temporary file is removed.

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path``, then move it over ``path``.

    The one atomic writer of the project (checkpoints, configs, ``metrics.json``,
    ``run.json``): the temporary is flushed and fsynced, then ``os.replace``-d over
    ``path``; if anything fails, ``path`` keeps its previous content (or stays absent) and
    the temporary is removed. A temporary left by a killed writer is swept later.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort; not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with clear errors.

    Raises:
        CheckpointError: the file does not exist, is not readable as a checkpoint, or
            would need arbitrary unpickling (it is refused, and nothing in it is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (resolved: {path.resolve()}). Check the path, or train "
            "Stage 1 first (it writes <run_dir>/stage1_detector.pth)."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # a corrupt file, not an unsafe one
            raise CheckpointError(f"{path}: could not be read as a PyTorch checkpoint ({exc})") from None
        detail = str(exc).strip().splitlines()
        reason = next((line for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0] if detail else "")
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint: reading it would require unpickling arbitrary "
            f"Python objects ({reason.strip()}). It was refused and NOT executed. If you trust its origin, "
            "re-save only its tensors (e.g. torch.save(model.state_dict(), path)) and load that file."
        ) from None
    except Exception as exc:  # truncated/corrupt files fail in many ways inside the unpickler
        raise CheckpointError(f"{path}: could not be read as a PyTorch checkpoint ({exc}); is the file complete?") from None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def to_primitive(value: Any, where: str, caller: str = "save_detector") -> Any:
    """``value`` as numbers, strings, booleans, None and lists/dicts of them (what a
    ``weights_only`` checkpoint may hold beside tensors): paths become strings, one-element
    tensors and NumPy scalars numbers.

    Raises:
        TypeError: anything else, naming ``caller`` and the place ``where`` in the structure.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:  # numpy scalar
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_primitive(v, f"{where}[{i}]", caller) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): to_primitive(v, f"{where}.{k}", caller) for k, v in value.items()}
    raise TypeError(f"{caller}: {where} is a {type(value).__name__}; only numbers, strings, booleans, None "
                    "and lists/dicts of them can be stored")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DataParallel/DistributedDataParallel wrappers (``model`` itself otherwise)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks; large XLS-R checkpoints take seconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()

"""Run directories: one exclusive owner at a time, a ``run.json`` record, no silent overwrite.

A run directory (``outputs/<run>/``) holds everything of one run. Two
processes must never write into the same one at the same time, so a process that works
in it holds ``run_dir/.lock``:

* the lock file is created atomically (``os.open(O_CREAT | O_EXCL)``) and holds the
  owner's pid, hostname, start time and command line (JSON);
* a lock whose owner is a live process (or a process on another host, which cannot be
  checked) makes :meth:`RunLock.acquire` raise :class:`RunDirectoryBusyError` naming
  the owner;
* a lock whose pid is dead (same host) is *stale*: it is taken over. The take-over is
  serialized by a second ``O_EXCL`` guard file so that two processes racing for the same
  stale lock cannot both win;
* child processes of the holder may work in the directory: while a lock is held its token
  is listed in the environment variable ``XAI_LIB_HELD_RUN_LOCKS``, which processes started
  meanwhile inherit (the notebook kernels of the pipeline, ``torchrun`` workers). Their
  :meth:`RunLock.acquire` then succeeds without taking the lock ("inherited") and their
  release leaves it alone. The holder itself (same pid) is still refused a second lock.

Example::

    with RunDirectory("outputs/my-run") as run:       # creates it, takes the lock
        record = run.read_record() or {}
        ...
        run.write_record(record)                       # atomic run.json update
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from xai_lib.files import atomic_write_text

__all__ = [
    "RunDirectoryError",
    "merge_metrics",
    "RunDirectoryBusyError",
    "LockInfo",
    "RunLock",
    "RunDirectory",
    "ENV_HELD_LOCKS",
    "pid_alive",
    "timestamp",
    "default_run_dir",
]

log = logging.getLogger(__name__)

#: An empty / half-written lock file younger than this is "being written", older is stale.
_EMPTY_LOCK_GRACE_S = 10.0
#: A take-over guard file older than this was left by a crashed process.
_GUARD_STALE_S = 30.0
#: Environment variable listing the locks held by this process's ancestors (and itself).
ENV_HELD_LOCKS = "XAI_LIB_HELD_RUN_LOCKS"


class RunDirectoryError(RuntimeError):
    """A run directory cannot be used as asked (the message says why and what to do)."""


class RunDirectoryBusyError(RunDirectoryError):
    """Another live process holds the run directory's lock."""


def timestamp() -> str:
    """Local time as ``YYYYmmdd-HHMMSS`` (run-directory names)."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        # "pid (comm) S ..."; comm may hold spaces/parens, the state follows the last ')'
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class LockInfo:
    """Who holds a run directory."""

    pid: int
    hostname: str
    started: str  # ISO time the lock was taken
    command: str = ""

    def is_live(self) -> bool:
        """True when the owner may still be running (another host's pid cannot be checked)."""
        if self.hostname != socket.gethostname():
            return True
        return pid_alive(self.pid)

    def describe(self) -> str:
        cmd = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on {self.hostname}, since {self.started}{cmd}"


def _read_lock(path: Path) -> LockInfo | None:
    """The lock's content, or None when the file is missing, empty or not (yet) valid."""
    try:
        data = json.loads(path.read_text())
        return LockInfo(int(data["pid"]), str(data["hostname"]), str(data["started"]), str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _file_age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


class RunLock:
    """The exclusive lock file of one run directory.

    Args:
        path: the lock file (``run_dir/.lock``).
        command: shown to whoever is refused (defaults to this process's command line).
        retry_s: how long to wait for a concurrent take-over / half-written lock to settle.
    """

    def __init__(self, path: str | Path, command: str | None = None, retry_s: float = 2.0) -> None:
        self.path = Path(path)
        self.command = command if command is not None else " ".join(sys.argv)
        self.retry_s = retry_s
        self.info: LockInfo | None = None  # ours (or our ancestor's, when inherited), while held
        self.inherited = False  # held by an ancestor process that started us

    @property
    def held(self) -> bool:
        return self.info is not None

    def _token(self, info: LockInfo) -> str:
        return f"{self.path.absolute()}|{info.pid}|{info.hostname}|{info.started}"

    @staticmethod
    def _exported() -> list[str]:
        try:
            tokens = json.loads(os.environ.get(ENV_HELD_LOCKS) or "[]")
        except ValueError:
            return []
        return [t for t in tokens if isinstance(t, str)] if isinstance(tokens, list) else []

    def _export(self, info: LockInfo, add: bool) -> None:
        token = self._token(info)
        tokens = [t for t in self._exported() if t != token] + ([token] if add else [])
        if tokens:
            os.environ[ENV_HELD_LOCKS] = json.dumps(tokens)
        else:
            os.environ.pop(ENV_HELD_LOCKS, None)

    def _held_by_ancestor(self, other: LockInfo) -> bool:
        return other.pid != os.getpid() and self._token(other) in self._exported()

    @staticmethod
    def read(path: str | Path) -> LockInfo | None:
        """Who holds the lock at ``path`` (None when nobody / unreadable)."""
        return _read_lock(Path(path))

    def acquire(self) -> LockInfo:
        """Take the lock (taking over a stale one).

        Raises:
            RunDirectoryBusyError: another live process holds it.
        """
        if self.held:
            return self.info  # type: ignore[return-value]
        deadline = time.monotonic() + self.retry_s
        for _attempt in range(10_000):
            info = LockInfo(os.getpid(), socket.gethostname(), _now_iso(), self.command)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(asdict(info)))
                self.info = info
                self._export(info, add=True)
                log.debug("took lock %s", self.path)
                return info
            # somebody's lock is there: live, stale, or still being written
            other = _read_lock(self.path)
            if other is not None and other.is_live():
                if self._held_by_ancestor(other):
                    log.debug("lock %s is held by our parent process %d; working under it", self.path, other.pid)
                    self.info, self.inherited = other, True
                    return other
                raise RunDirectoryBusyError(self._busy_message(other))
            if other is None:
                age = _file_age(self.path)
                if age is None:  # vanished meanwhile: try again
                    continue
                if age < _EMPTY_LOCK_GRACE_S:  # being written right now
                    if time.monotonic() > deadline:
                        raise RunDirectoryBusyError(
                            f"{self.path.parent} is being taken by another process (its lock file "
                            f"{self.path} is still empty); pick another --run-dir or retry"
                        )
                    time.sleep(0.05)
                    continue
            if not self._take_over(other):
                if time.monotonic() > deadline:
                    raise RunDirectoryBusyError(
                        f"another process is taking over the stale lock {self.path}; pick another run directory or retry"
                    )
                time.sleep(0.05)
        raise RunDirectoryError(f"could not take the lock {self.path} (is the directory writable?)")

    def _take_over(self, stale: LockInfo | None) -> bool:
        """Remove the stale lock ``stale`` under the guard file; False if the guard is busy."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            gfd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            age = _file_age(guard)
            if age is not None and age > _GUARD_STALE_S:
                guard.unlink(missing_ok=True)
            return False
        try:
            os.close(gfd)
            current = _read_lock(self.path)
            if current == stale:  # nobody replaced it since we looked
                if stale is not None:
                    log.warning("taking over the stale lock of %s (%s is gone)", self.path.parent, stale.describe())
                else:
                    log.warning("removing the empty, abandoned lock file %s", self.path)
                self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _busy_message(self, other: LockInfo) -> str:
        remote = other.hostname != socket.gethostname()
        hint = (
            f" If that job is gone (it ran on another machine, so its pid cannot be checked here), delete {self.path}."
            if remote
            else ""
        )
        return (
            f"run directory {self.path.parent} is in use by another live process ({other.describe()}). "
            f"Two runs must not write into one directory: pick another --run-dir, or wait for it to finish.{hint}"
        )

    def release(self) -> None:
        """Give the lock back (only removes the file if it is still ours)."""
        if self.info is None:
            return
        if not self.inherited:
            if _read_lock(self.path) == self.info:
                self.path.unlink(missing_ok=True)
            self._export(self.info, add=False)
        self.info, self.inherited = None, False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunDirectory:
    """One run directory: its lock, its ``run.json`` record and its ``metrics.json``.

    Args:
        path: the directory (made absolute; created by :meth:`acquire`).
        command: the command line recorded in the lock (defaults to ``sys.argv``).
    """

    LOCK_NAME = ".lock"
    RECORD_NAME = "run.json"
    METRICS_NAME = "metrics.json"
    #: run.json status of a run in progress; anything else is a completed (finished/failed/interrupted) run
    RUNNING = "running"

    def __init__(self, path: str | Path, command: str | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        self.lock = RunLock(self.path / self.LOCK_NAME, command=command)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r}, held={self.held})"

    # ------------------------------------------------------------------ paths
    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK_NAME

    @property
    def record_path(self) -> Path:
        return self.path / self.RECORD_NAME

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS_NAME

    # ------------------------------------------------------------------ lock
    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.lock.held

    def holder(self) -> LockInfo | None:
        """The live process holding the directory (None when free, stale, or held by this object)."""
        if self.held:
            return None
        info = RunLock.read(self.lock_path)
        return info if info is not None and info.is_live() else None

    def acquire(self) -> "RunDirectory":
        """Create the directory and take its lock.

        Raises:
            RunDirectoryBusyError: another live process holds it.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"run directory {self.path} exists and is not a directory; pick another --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        return self

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> "RunDirectory":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ records
    def read_record(self) -> dict[str, Any] | None:
        """``run.json`` as a dict (None when absent).

        Raises:
            RunDirectoryError: the file exists but is not valid JSON.
        """
        if not self.record_path.is_file():
            return None
        try:
            data = json.loads(self.record_path.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirectoryError(
                f"{self.record_path} is not valid JSON ({exc}); move it away or pick another --run-dir"
            ) from None
        return data if isinstance(data, dict) else None

    def write_record(self, record: Mapping[str, Any]) -> Path:
        """Write ``run.json`` atomically (temp file + rename)."""
        _atomic_write_json(self.record_path, record)
        return self.record_path

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json`` as a dict ({} when absent or unreadable)."""
        try:
            data = json.loads(self.metrics_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def drop_metrics(self, keys: list[str]) -> list[str]:
        """Remove ``keys`` from ``metrics.json`` (before re-running the stages that write them)."""
        data = self.read_metrics()
        dropped = [k for k in keys if k in data]
        if dropped:
            for k in dropped:
                del data[k]
            _atomic_write_json(self.metrics_path, data)
        return dropped

    def has_completed_run(self) -> bool:
        """Whether an earlier run finished here: a ``run.json`` whose run is not running now.

        A record saying ``running`` whose lock is stale is a crashed run: completed too.
        """
        record = self.read_record()
        if record is None:
            return False
        if record.get("status") != self.RUNNING:
            return True
        return self.held or self.holder() is None

    def archive(self) -> Path:
        """Rename the directory to ``<path>-<timestamp>`` (nothing is deleted); returns the new path.

        Raises:
            RunDirectoryBusyError: a live process holds it.
        """
        holder = self.holder()
        if holder is not None:
            raise RunDirectoryBusyError(self.lock._busy_message(holder))
        if self.held:
            raise RunDirectoryError(f"release {self.path} before archiving it")
        target = self.path.with_name(f"{self.path.name}-{timestamp()}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}-{timestamp()}-{n}")
            n += 1
        os.rename(self.path, target)
        return target


def _atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def default_run_dir(base: str | Path = "outputs", suffix: str = "run") -> Path:
    """A fresh ``<base>/<YYYYmmdd-HHMMSS>-<suffix>`` path (``-2``, ``-3``... appended if taken)."""
    base = Path(base)
    path = base / f"{timestamp()}-{suffix}"
    n = 2
    while path.exists():
        path = base / f"{timestamp()}-{suffix}-{n}"
        n += 1
    return path


def merge_metrics(run_dir: str | Path, key: str, values: dict[str, Any]) -> Path:
    """Merge ``{key: values}`` into ``run_dir/metrics.json`` atomically (other stages' keys kept;
    non-finite numbers are written as ``null``)."""
    path = Path(run_dir) / "metrics.json"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("metrics.json in %s was not valid JSON; starting a new one", run_dir)
    data[key] = _finite_or_null(json.loads(json.dumps(values, default=_json_default)))
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False))


def _finite_or_null(obj: Any) -> Any:
    """NaN/inf floats become ``null`` (strict JSON: ``jq`` and browsers reject ``NaN``), e.g. the
    dev EER of a Stage-1 epoch whose dev set was not scored."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_null(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # NumPy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

"""Resolving user-given paths the same way from a notebook, the pipeline and the CLI."""
from __future__ import annotations

from pathlib import Path

__all__ = ["PROJECT_ROOT", "resolve_path"]

#: The checkout that holds ``xai_lib/``, ``configs/`` and ``notebooks/``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    """An absolute path for ``path``.

    Absolute paths are returned as they are. A relative path is taken relative to the
    current directory when it exists there, else relative to the project root — so
    ``configs/demo.yaml`` works both from the repository root and from ``notebooks/``.
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.exists():
        return p.resolve()
    candidate = PROJECT_ROOT / p
    if candidate.exists() or not Path.cwd().joinpath(p).parent.exists():
        return candidate
    return p.resolve()

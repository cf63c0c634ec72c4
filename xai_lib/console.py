"""The one reporter for command-line output.

Library code logs (``logging``); the commands (``python -m xai_lib.pipeline``, ``.train``,
``.bench``, ``.explain``) tell the user what happens through :func:`say` (stdout) and
:func:`say_error` (stderr), flushed at once so that the lines interleave correctly with
the output of the notebooks they run.
"""
from __future__ import annotations

import sys

__all__ = ["say", "say_error"]


def say(text: str) -> None:
    """One message for the user on stdout."""
    print(text, file=sys.stdout, flush=True)


def say_error(text: str) -> None:
    """One problem for the user on stderr."""
    print(text, file=sys.stderr, flush=True)

"""Audio loading, cropping and batching (soundfile I/O, torchaudio only for resampling).

``load_audio`` reads FLAC/WAV/OGG with soundfile, downmixes to mono (mean of channels),
resamples to the requested rate and refuses unusable files (unreadable, empty, NaN/inf)
with an :class:`AudioError` that names the file and says what to do.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
import torch

__all__ = ["AudioError", "load_audio", "crop_or_pad", "splice", "pad_batch"]

log = logging.getLogger(__name__)

#: The reason given for a 0-byte file.
EMPTY_FILE = "audio file is empty (0 bytes; an interrupted copy or download?)"

_FIX = "remove it from the protocol, re-encode it, or set data.on_bad_audio: skip to skip bad files"


class AudioError(ValueError):
    """An audio file cannot be used (missing, unreadable, empty, non-finite); the message names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}; {_FIX}")


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``.

    Args:
        path: a FLAC/WAV/OGG file (anything libsndfile reads).
        sample_rate: the wanted rate; other rates are resampled with
            ``torchaudio.functional.resample``.

    Returns:
        (N,) float32 samples (nominally in [-1, 1]).

    Raises:
        AudioError: missing, empty (0 bytes), unreadable/corrupt, zero-length or NaN/inf file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "audio file does not exist")
    if path.stat().st_size == 0:  # an interrupted copy/download; libsndfile would only say "format not recognised"
        raise AudioError(path, EMPTY_FILE)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except Exception as exc:  # libsndfile raises LibsndfileError/RuntimeError/TypeError
        raise AudioError(path, f"unreadable or corrupt audio ({type(exc).__name__}: {exc})") from None
    if data.shape[0] == 0:
        raise AudioError(path, "audio file has zero length (no samples)")
    if not np.isfinite(data).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), int(sr), int(sample_rate)).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def crop_or_pad(x: np.ndarray, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Exactly ``n`` samples: a crop when longer, repeat-padding (tiling) when shorter.

    Args:
        x: (N,) samples, N > 0.
        n: wanted length.
        rng: chooses the crop start uniformly; ``None`` crops from the start (deterministic).

    Returns:
        (n,) array of ``x``'s dtype.
    """
    if n <= 0:
        raise ValueError(f"crop length must be positive, got {n}")
    if len(x) == 0:
        raise ValueError("cannot crop or pad an empty signal")
    if len(x) > n:
        start = int(rng.integers(0, len(x) - n + 1)) if rng is not None else 0
        return x[start : start + n]
    if len(x) < n:
        return np.tile(x, math.ceil(n / len(x)))[:n]
    return x


def splice(orig: np.ndarray, other: np.ndarray, spans: Sequence[tuple[int, int]], fade: int = 80) -> np.ndarray:
    """Replace ``spans`` of ``orig`` with the same samples of ``other``, level-matched.

    Each span ``[start, end)`` takes ``other[start:end]`` scaled to the RMS of ``orig`` over the
    span, cross-faded with raised-cosine ramps of ``fade`` samples inside the span (80 = 5 ms at
    16 kHz), so that the seam itself is not a step. The synthetic corpus builds its partially
    spoofed utterances with this, and :class:`~xai_lib.data.datasets.TrainDataset` its spliced crops.

    Args:
        orig: (N,) the signal spliced into.
        other: (>= max end,) the signal the spans come from (aligned sample by sample with ``orig``).
        spans: ``[(start, end), ...]`` sample spans inside ``orig``.
        fade: ramp length in samples (shortened to half a span for short spans).

    Returns:
        (N,) a new array (float64 when the inputs are).
    """
    y = orig.copy()
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    for s, e in spans:
        if not 0 <= s < e <= len(orig) or e > len(other):
            raise ValueError(f"splice span [{s}, {e}) outside the signals ({len(orig)}, {len(other)} samples)")
        a = other[s:e]
        g = np.sqrt(np.mean(orig[s:e] ** 2) / max(np.mean(a**2), 1e-12))
        w = np.ones(e - s)
        f = min(fade, (e - s) // 2)
        w[:f], w[e - s - f :] = ramp[:f], ramp[:f][::-1]
        y[s:e] = (1.0 - w) * orig[s:e] + w * g * a
    return y


def pad_batch(waves: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length waves with zero right-padding.

    Args:
        waves: B one-dimensional arrays/tensors.

    Returns:
        wave: (B, L) float32, L = the longest length; lengths: (B,) long.
    """
    tensors = [torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w, dtype=torch.float32) for w in waves]
    lengths = torch.tensor([int(t.shape[0]) for t in tensors], dtype=torch.long)
    out = torch.zeros(len(tensors), int(lengths.max()) if len(tensors) else 0, dtype=torch.float32)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out, lengths

"""Torch datasets over protocols, the padding collate function and split building.

``TrainDataset`` yields fixed-length, optionally RawBoost-augmented crops whose randomness
depends only on ``(seed, epoch, index)`` (reproducible regardless of DataLoader workers);
``EvalDataset`` yields full-length waves (or the first ``crop_samples``; files shorter than one
SSL frame are repeat-padded to it). Bad audio either raises
:class:`~xai_lib.data.audio.AudioError` or, with ``on_bad_audio="skip"``, is skipped,
recorded and reported. ``build_split`` turns a :class:`~xai_lib.config.DataConfig` into the
utterance list of a split.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from xai_lib.config import DataConfig
from xai_lib.data.audio import EMPTY_FILE, AudioError, crop_or_pad, load_audio, pad_batch, splice
from xai_lib.data.protocols import ProtocolError, Utterance, check_files_exist, load_segment_labels, read_protocol
from xai_lib.data.rawboost import rawboost

__all__ = [
    "TrainDataset",
    "EvalDataset",
    "collate_padded",
    "scan_audio",
    "build_split",
    "load_partial_split",
    "subsample_utterances",
    "SUBSAMPLE_SEED",
    "MIN_SSL_SAMPLES",
]

log = logging.getLogger(__name__)

#: The fixed seed of ``max_*_utts`` subsampling (the same subset on every run).
SUBSAMPLE_SEED = 0

#: Samples in the receptive field of one wav2vec 2.0 / XLS-R frame (25 ms at 16 kHz): the
#: shortest input the SSL front end scores (``Detector.min_input_samples`` of those front ends).
MIN_SSL_SAMPLES = 400

Skipped = tuple[str, str, str]  # (utt_id, path, reason)


class _AudioDataset(Dataset):
    """Shared bad-audio bookkeeping, and the decoded-audio cache (``cache_mb``: keep decoded waves
    in memory up to this many MiB, in this process; 0 = off). A cached wave is handed out as a copy,
    so what a caller does to it never reaches the next epoch."""

    def __init__(self, utts: Sequence[Utterance], sample_rate: int, on_bad_audio: str, cache_mb: float = 0.0) -> None:
        if on_bad_audio not in ("error", "skip"):
            raise ValueError(f"on_bad_audio must be 'error' or 'skip', got {on_bad_audio!r}")
        if not cache_mb >= 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.utts = list(utts)
        self.sample_rate = sample_rate
        self.on_bad_audio = on_bad_audio
        self.skipped: list[Skipped] = []
        self._skipped_ids: set[str] = set()
        self._cache: dict[str, np.ndarray] = {}
        self._cache_limit = int(cache_mb * 2**20)
        self.cache_bytes = 0

    def __len__(self) -> int:
        return len(self.utts)

    def _load(self, utt: Utterance) -> np.ndarray | None:
        key = str(utt.path)
        cached = self._cache.get(key)
        if cached is not None:
            return cached.copy()
        try:
            x = load_audio(utt.path, self.sample_rate)
        except AudioError as exc:
            if self.on_bad_audio == "error":
                raise
            if utt.utt_id not in self._skipped_ids:
                self._skipped_ids.add(utt.utt_id)
                self.skipped.append((utt.utt_id, str(utt.path), exc.reason))
                log.warning("skipping %s (%s): %s", utt.utt_id, utt.path, exc.reason)
            return None
        if self.cache_bytes + x.nbytes <= self._cache_limit:
            self._cache[key] = x.copy()
            self.cache_bytes += x.nbytes
        return x

    def bad_audio_report(self) -> str:
        """A human-readable list of the skipped utterances (empty string when none).

        With DataLoader workers (``num_workers > 0``) skips happen in the worker processes and
        are not seen here; use :func:`scan_audio` before training for a complete list.
        """
        return _report(self.skipped, len(self.utts))

    @staticmethod
    def _item(utt: Utterance, wave: np.ndarray, spoof_span: tuple[int, int] | None = None) -> dict[str, Any]:
        """One item; ``spoof_span``: the spoofed samples ``[start, end)`` of ``wave`` (default: all
        of a spoof utterance, none of a bona fide one)."""
        if spoof_span is None:
            spoof_span = (0, len(wave)) if utt.label == 0 else (0, 0)
        return {
            "wave": torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)),
            "label": -1 if utt.label is None else int(utt.label),
            "utt_id": utt.utt_id,
            "attack": utt.attack,
            "spoof_span": tuple(int(s) for s in spoof_span),
        }


def _report(skipped: Sequence[Skipped], total: int) -> str:
    if not skipped:
        return ""
    lines = [f"{len(skipped)} of {total} utterances skipped because of bad audio:"]
    lines += [f"  {u}  {p}: {r}" for u, p, r in skipped]
    return "\n".join(lines)


class TrainDataset(_AudioDataset):
    """Fixed-length training crops with optional RawBoost.

    Args:
        utts: the training utterances.
        crop_samples: crop length (repeat-padded when an utterance is shorter).
        sample_rate: audio is resampled to this rate.
        rawboost_algo: 0 = off, 1..8 (see :mod:`xai_lib.data.rawboost`).
        seed: base seed; item ``i`` of epoch ``e`` uses ``default_rng([seed, e, i])``.
        on_bad_audio: ``"error"`` raises AudioError, ``"skip"`` returns ``None`` (dropped by
            :func:`collate_padded`) and records the file in ``skipped``.

        splice_prob: probability that a crop is spliced (0 = off): a spoof item becomes a crop of a
            random bona fide utterance with one span of its own crop inserted (a partially spoofed
            crop, still labelled spoof); a bona fide item gets one span of another bona fide crop
            (labelled bona fide), so that the seams themselves carry no label.
        splice_min_samples, splice_max_fraction: the inserted span is between this many samples
            and this fraction of the crop long, at a uniform position.
        cache_mb: keep decoded files in memory up to this many MiB (0 = off): every epoch takes
            the same crops either way, since crops are drawn after decoding.

    Items: ``{"wave": (crop_samples,) float32, "label": int, "utt_id": str, "attack": str}``.
    The crop is taken first and RawBoost applied to it (cheaper than augmenting the whole file).
    """

    def __init__(
        self,
        utts: Sequence[Utterance],
        crop_samples: int,
        sample_rate: int = 16000,
        rawboost_algo: int = 0,
        seed: int = 0,
        on_bad_audio: str = "error",
        splice_prob: float = 0.0,
        splice_min_samples: int = 1600,
        splice_max_fraction: float = 0.5,
        cache_mb: float = 0.0,
    ) -> None:
        super().__init__(utts, sample_rate, on_bad_audio, cache_mb)
        if not 0.0 <= splice_prob <= 1.0:
            raise ValueError(f"splice_prob must be in [0, 1], got {splice_prob}")
        self.splice_prob = float(splice_prob)
        self.splice_min_samples = max(1, int(splice_min_samples))
        self.splice_max_samples = max(self.splice_min_samples, int(splice_max_fraction * crop_samples))
        if self.splice_prob and self.splice_max_samples > crop_samples:
            raise ValueError(f"splice spans ({self.splice_max_samples} samples) do not fit the crop ({crop_samples})")
        self._bonafide = [i for i, u in enumerate(self.utts) if u.label == 1]
        if crop_samples <= 0:
            raise ValueError(f"crop_samples must be positive, got {crop_samples}")
        if not 0 <= rawboost_algo <= 8:
            raise ValueError(f"rawboost_algo must be 0..8, got {rawboost_algo}")
        self.crop_samples = crop_samples
        self.rawboost_algo = rawboost_algo
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops/augmentations are drawn (call before each epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        utt = self.utts[index]
        x = self._load(utt)
        if x is None:
            return None
        rng = np.random.default_rng([self.seed % 2**32, self.epoch, index])
        x = crop_or_pad(x, self.crop_samples, rng)  # (crop_samples,)
        span = None
        if self.splice_prob and utt.label in (0, 1) and rng.random() < self.splice_prob:
            x, span = self._splice(index, utt.label, x, rng)
        if self.rawboost_algo:
            x = rawboost(x, self.rawboost_algo, self.sample_rate, rng)
        return self._item(utt, x, span)

    def _splice(
        self, index: int, label: int, x: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, tuple[int, int] | None]:
        """``x`` spliced with a random bona fide partner (see the class doc) and its spoofed span
        (``(0, 0)`` for a bona fide crop); ``(x, None)`` when there is no partner."""
        partners = [i for i in self._bonafide if i != index] if label == 1 else self._bonafide
        if not partners:
            return x, None
        other = self._load(self.utts[partners[int(rng.integers(len(partners)))]])
        if other is None:
            return x, None
        other = crop_or_pad(other, self.crop_samples, rng)
        n = int(rng.integers(self.splice_min_samples, self.splice_max_samples + 1))
        start = int(rng.integers(0, self.crop_samples - n + 1))
        base, inserted = (other, x) if label == 0 else (x, other)  # a spoof span goes into a bona fide crop
        fade = max(1, int(0.005 * self.sample_rate))
        y = splice(base.astype(np.float64), inserted.astype(np.float64), [(start, start + n)], fade).astype(x.dtype)
        return y, ((start, start + n) if label == 0 else (0, 0))


class EvalDataset(_AudioDataset):
    """Full-length evaluation waves (or the first ``crop_samples``, repeat-padded).

    Args:
        utts: the utterances to score.
        sample_rate: audio is resampled to this rate.
        crop_samples: ``None`` = full length; else exactly this many samples from the start.
        on_bad_audio: as for :class:`TrainDataset`.
        min_samples: waves shorter than this are repeat-padded to it (as training crops are),
            with a warning naming the utterance, so that a very short file is scored instead of
            stopping the whole split. The default, :data:`MIN_SSL_SAMPLES`, is the 400-sample
            (25 ms) window of one wav2vec 2.0 / XLS-R frame; pass a detector's
            ``min_input_samples`` for another front end. ``0`` disables it.
        cache_mb: keep decoded files in memory up to this many MiB (0 = off), for a split scored
            every epoch.

    The ids of padded utterances are kept in ``padded`` (``(utt_id, path, original_length)``).
    """

    def __init__(
        self,
        utts: Sequence[Utterance],
        sample_rate: int = 16000,
        crop_samples: int | None = None,
        on_bad_audio: str = "error",
        min_samples: int = MIN_SSL_SAMPLES,
        cache_mb: float = 0.0,
    ) -> None:
        super().__init__(utts, sample_rate, on_bad_audio, cache_mb)
        self.crop_samples = crop_samples
        self.min_samples = int(min_samples)
        self.padded: list[tuple[str, str, int]] = []
        self._padded_ids: set[str] = set()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        utt = self.utts[index]
        x = self._load(utt)
        if x is None:
            return None
        if self.crop_samples is not None:
            x = crop_or_pad(x, self.crop_samples, None)
        if len(x) < self.min_samples:
            if utt.utt_id not in self._padded_ids:
                self._padded_ids.add(utt.utt_id)
                self.padded.append((utt.utt_id, str(utt.path), len(x)))
                log.warning("%s (%s) has only %d samples, fewer than the %d of one SSL frame; it is repeat-padded "
                            "to %d samples for scoring", utt.utt_id, utt.path, len(x), self.min_samples, self.min_samples)
            x = crop_or_pad(x, self.min_samples, None)
        return self._item(utt, x)


def collate_padded(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch dataset items with zero right-padding; ``None`` items (skipped audio) are dropped.

    Returns:
        ``wave`` (B, L) float32, ``lengths`` (B,) long, ``labels`` (B,) long (-1 = unknown),
        ``utt_ids`` list[str], ``attacks`` list[str], ``spoof_spans`` (B, 2) long: the spoofed
        samples ``[start, end)`` of each wave. B may be 0 when every item was skipped.
    """
    kept = [it for it in items if it is not None]
    wave, lengths = pad_batch([it["wave"] for it in kept])
    return {
        "wave": wave,
        "lengths": lengths,
        "labels": torch.tensor([int(it["label"]) for it in kept], dtype=torch.long),
        "utt_ids": [it["utt_id"] for it in kept],
        "attacks": [it.get("attack", "-") for it in kept],
        "spoof_spans": torch.tensor([it.get("spoof_span", (0, 0)) for it in kept], dtype=torch.long).reshape(-1, 2),
    }


def scan_audio(
    utts: Sequence[Utterance], sample_rate: int = 16000, on_bad_audio: str = "error"
) -> tuple[list[Utterance], list[Skipped]]:
    """Check every file's header with ``soundfile.info`` (cheap: no decoding).

    Finds missing, unreadable and zero-length files (NaN samples need decoding and are
    caught at load time). ``on_bad_audio="error"`` raises one AudioError listing the count and
    the first five; ``"skip"`` returns the good utterances and ``(utt_id, path, reason)`` of the bad.
    Files at another rate than ``sample_rate`` are fine (resampled on load) and only logged.
    """
    good: list[Utterance] = []
    bad: list[Skipped] = []
    other_rates: set[int] = set()
    for u in utts:
        path = Path(u.path)
        reason = None
        if not path.is_file():
            reason = "audio file does not exist"
        elif path.stat().st_size == 0:
            reason = EMPTY_FILE
        else:
            try:
                info = sf.info(str(path))
                if info.frames <= 0:
                    reason = "audio file has zero length (no samples)"
                elif info.samplerate != sample_rate:
                    other_rates.add(int(info.samplerate))
            except Exception as exc:
                reason = f"unreadable or corrupt audio ({type(exc).__name__}: {exc})"
        if reason is None:
            good.append(u)
        else:
            bad.append((u.utt_id, str(path), reason))
    if other_rates:
        log.info("some files are at %s Hz; they are resampled to %d Hz on load", sorted(other_rates), sample_rate)
    if bad and on_bad_audio == "error":
        first = "\n  ".join(f"{p}: {r}" for _, p, r in bad[:5])
        raise AudioError(bad[0][1], f"{len(bad)} of {len(utts)} audio files are unusable; first ones:\n  {first}\n")
    if bad:
        log.warning(_report(bad, len(utts)))
    return good, bad


def subsample_utterances(utts: Sequence[Utterance], n: int | None, seed: int = SUBSAMPLE_SEED) -> list[Utterance]:
    """At most ``n`` utterances, stratified by label (each class keeps its share, at least one
    utterance per class when ``n`` allows), chosen with a fixed seed, in protocol order."""
    utts = list(utts)
    if n is None or n >= len(utts):
        return utts
    if n <= 0:
        raise ValueError(f"subsample size must be positive, got {n}")
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i, u in enumerate(utts):
        groups.setdefault(u.label, []).append(i)
    keys = sorted(groups, key=lambda k: (k is None, k))
    quota = {k: len(groups[k]) * n // len(utts) for k in keys}
    for k in keys:  # every class present when possible
        if quota[k] == 0 and sum(quota.values()) < n:
            quota[k] = 1
    for k in sorted(keys, key=lambda k: -len(groups[k])):  # distribute the remainder
        while sum(quota.values()) < n and quota[k] < len(groups[k]):
            quota[k] += 1
    chosen: list[int] = []
    for k in keys:
        idx = groups[k]
        chosen += list(rng.choice(idx, size=quota[k], replace=False)) if quota[k] < len(idx) else idx
    return [utts[i] for i in sorted(int(i) for i in chosen)]


def _protocol_path(cfg: DataConfig, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(cfg.root).expanduser() / p


def _audio_dir(cfg: DataConfig, key: str, what: str) -> Path | None:
    """The folder ``data.<key>`` names (relative to ``root`` unless absolute); None: discover it."""
    value = getattr(cfg, key)
    if value is None:
        return None
    path = _protocol_path(cfg, value)
    if not path.is_dir():
        raise ProtocolError(
            f"data.{key} = {value!r}: no such folder ({path}); point it at the folder holding the {what} audio "
            "(relative to data.root unless absolute), or set it to null to find the folder next to the protocol"
        )
    return path


def build_split(data_cfg: DataConfig, split: str) -> list[Utterance]:
    """The utterances of ``split`` ("train", "dev" or "eval") described by ``data_cfg``.

    Reads ``data_cfg.{split}_protocol`` (relative to ``data_cfg.root`` unless absolute) in
    ``data_cfg.format``, its audio from ``data_cfg.{split}_audio_dir`` (discovered when null),
    subsamples to ``max_train_utts`` (train) / ``max_eval_utts`` (dev, eval) with a fixed seed,
    and checks that every audio file exists.

    Raises:
        ProtocolError: no protocol configured for the split, a malformed protocol or a missing
            ``{split}_audio_dir``.
        MissingAudioError: listed audio files are missing.
    """
    if split not in ("train", "dev", "eval"):
        raise ValueError(f"split must be 'train', 'dev' or 'eval', got {split!r}")
    value = getattr(data_cfg, f"{split}_protocol")
    if not value:
        raise ProtocolError(f"data.{split}_protocol is not set; point it at the {split} protocol file")
    path = _protocol_path(data_cfg, value)
    audio_dir = _audio_dir(data_cfg, f"{split}_audio_dir", split)
    utts = read_protocol(path, root=data_cfg.root, format=data_cfg.format, audio_dir=audio_dir)
    limit = data_cfg.max_train_utts if split == "train" else data_cfg.max_eval_utts
    utts = subsample_utterances(utts, limit)
    check_files_exist(utts, path)
    return utts


def load_partial_split(data_cfg: DataConfig, split: str) -> tuple[list[Utterance], dict[str, np.ndarray]]:
    """The partially spoofed utterances of ``split`` ("dev" or "eval") and their segment labels.

    Uses ``data_cfg.partial_{split}_protocol``, ``partial_{split}_segment_labels`` and
    ``partial_{split}_audio_dir`` (discovered when null), relative to ``root`` unless absolute,
    subsampled to ``max_eval_utts``.

    Returns:
        utterances, and utt → int8 segment labels (PartialSpoof convention: 1 = bona fide,
        0 = spoof; see :func:`~xai_lib.data.protocols.spoof_frame_mask`).

    Raises:
        ProtocolError: unset/malformed protocol or labels, utterances without segment labels, or
            a missing ``partial_{split}_audio_dir``.
        MissingAudioError: listed audio files are missing.
    """
    if split not in ("dev", "eval"):
        raise ValueError(f"partial split must be 'dev' or 'eval', got {split!r}")
    proto_value = getattr(data_cfg, f"partial_{split}_protocol")
    labels_value = getattr(data_cfg, f"partial_{split}_segment_labels")
    if not proto_value or not labels_value:
        raise ProtocolError(
            f"data.partial_{split}_protocol and data.partial_{split}_segment_labels must both be set "
            "to evaluate localization on partially spoofed audio"
        )
    path = _protocol_path(data_cfg, proto_value)
    audio_dir = _audio_dir(data_cfg, f"partial_{split}_audio_dir", f"partially spoofed {split}")
    # PartialSpoof protocols have their own (5-column) layout whatever data.format says
    utts = read_protocol(path, root=data_cfg.root, format="auto", audio_dir=audio_dir)
    utts = subsample_utterances(utts, data_cfg.max_eval_utts)
    label_path = _protocol_path(data_cfg, labels_value)
    seglab = load_segment_labels(label_path)
    missing = [u.utt_id for u in utts if u.utt_id not in seglab]
    if missing:
        raise ProtocolError(
            f"{label_path}: no segment labels for {len(missing)} of {len(utts)} utterances of {path} "
            f"(first: {', '.join(missing[:5])}); the protocol and the label file do not belong together"
        )
    check_files_exist(utts, path)
    return utts, {u.utt_id: seglab[u.utt_id] for u in utts}

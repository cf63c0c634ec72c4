"""Data layer: protocol readers, audio loading, RawBoost, datasets, synthetic corpus.

Submodules:
    protocols  -- ASVspoof 2019/2021, 3-column, In-the-Wild and PartialSpoof protocol readers,
                  segment labels (restricted unpickler), missing-file checks.
    audio      -- soundfile loading (mono, resampled), crop/repeat-pad, batch padding.
    rawboost   -- RawBoost augmentation, algorithms 1..8 (``xai_lib.data.rawboost.rawboost``).
    datasets   -- TrainDataset/EvalDataset, collate_padded, scan_audio, build_split.
    synthetic  -- the embedded deterministic corpus (``python -m xai_lib.data.synthetic``).

The names below are imported lazily, so ``import xai_lib.data.synthetic`` (the corpus CLI)
does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Utterance": "protocols",
    "ProtocolError": "protocols",
    "MissingAudioError": "protocols",
    "UnsafePickleError": "protocols",
    "read_protocol": "protocols",
    "check_files_exist": "protocols",
    "load_segment_labels": "protocols",
    "spoof_frame_mask": "protocols",
    "AudioError": "audio",
    "load_audio": "audio",
    "crop_or_pad": "audio",
    "pad_batch": "audio",
    "TrainDataset": "datasets",
    "EvalDataset": "datasets",
    "collate_padded": "datasets",
    "scan_audio": "datasets",
    "build_split": "datasets",
    "load_partial_split": "datasets",
    "generate_corpus": "synthetic",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xai_lib.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

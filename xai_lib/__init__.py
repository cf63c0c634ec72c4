"""xai_lib: explainable audio-deepfake detection.

Stage 1 trains an SSL (wav2vec 2.0 / XLS-R) + Conformer-TCM detector, Stage 2 trains a
representation-grounded XAI module on the frozen detector, Stage 3 attributes, measures
and visualises which 20 ms frames made the detector call an utterance fake.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_detector", "explain", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import xai_lib` stays cheap
    if name == "load_detector":
        from xai_lib.detector.checkpoint import load_detector

        return load_detector
    if name == "explain":  # the module, callable as explain(path_or_wave, run_dir, ...)
        import importlib

        return importlib.import_module("xai_lib.explain")
    raise AttributeError(f"module 'xai_lib' has no attribute {name!r}")

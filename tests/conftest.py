"""Shared test fixtures: a tiny seeded synthetic corpus and tiny model configs."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# child processes too (notebook kernels, the pipeline, torchrun ranks): tiny models on one thread each;
# two OpenMP threads per process on a shared 2-core machine can be 5x slower (measured: Stage 3 smoke)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is faster and deterministic


# The test files that hold the longest tests (measured on a 2-core machine: the smoke notebooks
# 118 s, the relocated-corpus pipeline 103 s, the torchrun tests 15-18 s each). They are
# collected first so that `make test` (xdist, one file per worker, --no-loadscope-reorder) starts them
# on different workers at once instead of leaving one of them for the end of the run.
LONG_FILES = ("test_notebooks.py", "test_data_layout.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test module starts on one thread, whatever a training run in an earlier one set
    (``training.num_threads``)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A tiny synthetic corpus in the ASVspoof 2019 LA layout (generated once per session)."""
    from xai_lib.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("tiny_corpus")
    generate_corpus(out, seed=0, size="tiny")
    return out


def tiny_model_dict() -> dict:
    """Architecture of a tiny detector (a few ms per forward pass on CPU)."""
    return {
        "ssl": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "conv_dim": [16] * 7,
            "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
            "conv_stride": [5, 2, 2, 2, 2, 2, 2],
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
        },
        "emb_size": 16,
        "num_encoders": 2,
        "heads": 2,
        "kernel_size": 7,
    }


@pytest.fixture
def tiny_model_config():
    from xai_lib.config import ModelConfig, config_from_dict

    return config_from_dict(tiny_model_dict(), ModelConfig)

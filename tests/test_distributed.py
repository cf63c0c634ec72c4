"""torchrun on CPU (gloo): N processes train and score like one.

Every test launches ``torchrun --standalone --nproc_per_node 2`` in a subprocess on the tiny
synthetic corpus and a tiny detector; the single-process references run in this process
through the same CLI (``xai_lib.train.main``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_model_dict
from xai_lib.detector.metrics import read_score_file
from xai_lib.train import main as train_main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
LR = 1e-3

# Parameters whose true gradient is exactly zero, so that their updates are Adam-normalised
# floating-point noise (each step moves them by up to +-lr whatever the noise's size) and two
# mathematically identical runs may differ there by up to 2 * lr * steps:
#  * the depthwise-conv bias right before a BatchNorm (BatchNorm removes any per-channel
#    shift) and that BatchNorm's running mean, which tracks the drifting bias;
#  * the attention key bias (adding q . b to every key of a query leaves the softmax unchanged).
GAUGE_PARAMS = ("conv.net.4.conv.bias", "conv.net.5.running_mean", "k_proj.bias")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in this process too (as torchrun gives each rank): two spinning OpenMP
    threads on a shared 2-core machine can slow a run down 20-50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def tiny_cfg(tiny_corpus, tmp_path_factory) -> Path:
    """A Stage-1 YAML: tiny detector, tiny corpus, 0.25 s crops, global batch 8, 2 epochs of 3 steps."""
    cfg = {
        "model": tiny_model_dict(),
        "data": {"root": str(tiny_corpus), "format": "asvspoof2019", "crop_samples": 4000, "rawboost_algo": 0},
        "training": {"batch_size": 8, "eval_batch_size": 4, "num_epochs": 2, "optimizer": "adamw", "lr": LR,
                     "patience": 5, "keep_best": 2, "seed": 7, "device": "cpu"},
    }
    path = tmp_path_factory.mktemp("dist_cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tiny_cfg, tmp_path_factory) -> dict[str, Path]:
    """The same Stage-1 training once in this process and once under torchrun with 2 ranks."""
    base = tmp_path_factory.mktemp("dist_runs")
    assert train_main(["stage1", "--config", str(tiny_cfg), "--run-dir", str(base / "one")]) == 0
    _ok(_torchrun(["-m", "xai_lib.train", "stage1", "--config", str(tiny_cfg), "--run-dir", str(base / "two")]))
    return {"one": base / "one", "two": base / "two"}


def test_ddp_gradients_equal_across_ranks_and_match_one_process(tmp_path):
    """(a) After one DDP step every rank holds the same gradients and weights, and they are the
    gradients of one process on the whole global batch (global-batch loss and BatchNorm)."""
    (tmp_path / "model.json").write_text(json.dumps(tiny_model_dict()))
    _ok(_torchrun([str(WORKER), "grads", str(tmp_path)]))
    g0, g1 = (torch.load(tmp_path / f"grads_rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "grads_single.pt", weights_only=True)
    assert g0.keys() == g1.keys() == single.keys() and len(g0) > 20
    for name in g0:
        assert torch.equal(g0[name], g1[name]), f"rank gradients differ for {name}"
        assert torch.allclose(g0[name], single[name], rtol=1e-3, atol=1e-6), (
            f"{name}: DDP gradient differs from the one-process gradient by "
            f"{(g0[name] - single[name]).abs().max().item():.3g}"
        )
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks hold different weights after the step"


def test_two_process_training_matches_one_process(runs):
    """(b) 2 ranks x 4 utterances train the same detector as 1 process x 8 (same seed).

    BatchNorm statistics are synchronised over the ranks (GlooSyncBatchNorm), so the runs are
    identical up to floating-point summation order: the loss curves agree to 1e-4 and every
    weight with a non-zero gradient to 1e-4. Weights whose true gradient is zero
    (GAUGE_PARAMS) drift by Adam-normalised noise, bounded by 2 * lr * steps. In training mode
    that drift changes nothing; in eval mode the BatchNorm running mean (an average of past
    batches) lags the drifting bias a little, so eval scores agree to a few 1e-4, not 1e-6.
    """
    from xai_lib.detector.checkpoint import load_detector

    one, two = (load_detector(runs[k] / "stage1_detector.pth") for k in ("one", "two"))
    r1, r2 = one.load_report.extra, two.load_report.extra
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["global_batch"] == r2["global_batch"] == 8
    assert r1["averaged_epochs"] == r2["averaged_epochs"]
    s1, s2 = one.state_dict(), two.state_dict()
    steps = 2 * 3  # 2 epochs x 24 utterances / 8
    for name, a in s1.items():
        if not a.is_floating_point():
            continue
        diff = (a - s2[name]).abs().max().item()
        bound = 2 * LR * steps if any(g in name for g in GAUGE_PARAMS) else 1e-4
        assert diff <= bound, f"{name}: 1-process and 2-process weights differ by {diff:.3g} (> {bound:.3g})"
    h1 = torch.load(runs["one"] / "checkpoints/stage1/last.pth", weights_only=True)["history"]
    h2 = torch.load(runs["two"] / "checkpoints/stage1/last.pth", weights_only=True)["history"]
    # the losses of weights that agree to float noise (above): 2.8e-4 relative seen on an AMD EPYC
    for key in ("train_loss", "dev_loss"):
        assert h1[key] == pytest.approx(h2[key], rel=1e-3, abs=1e-4), key
    wave = 0.1 * torch.randn(3, 6000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(one(wave).scores, two(wave).scores, atol=5e-3)


def test_two_process_scoring_equals_one_process(runs, tiny_cfg, tmp_path):
    """(c) ``score`` sharded over 2 ranks writes the same scores as 1 process (full-length,
    padded batches of different composition: the padding masks make them exact)."""
    ckpt = runs["one"] / "stage1_detector.pth"
    args = ["score", "--checkpoint", str(ckpt), "--config", str(tiny_cfg), "--split", "eval"]
    assert train_main([*args, "--out", str(tmp_path / "one.txt")]) == 0
    _ok(_torchrun(["-m", "xai_lib.train", *args, "--out", str(tmp_path / "two.txt")]))
    one, two = read_score_file(tmp_path / "one.txt"), read_score_file(tmp_path / "two.txt")
    assert len(one) == 24 and list(one) == list(two)  # every eval utterance, protocol order
    for utt in one:
        assert abs(one[utt] - two[utt]) < 1e-5, utt


def test_failing_rank_fails_the_whole_run(tiny_cfg, tmp_path):
    """(d) One rank raising makes torchrun exit non-zero and shows that rank's error."""
    proc = _torchrun([str(WORKER), "fail-rank1", "stage1", "--config", str(tiny_cfg),
                      "--run-dir", str(tmp_path / "run")], timeout=120)
    assert proc.returncode != 0
    assert "[rank 1] RuntimeError: injected failure on rank 1" in proc.stderr  # the rank's own line
    # torchrun's summary names the failed rank as the root cause, with its traceback
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1\b", root_cause) and "injected failure on rank 1" in root_cause
    assert not (tmp_path / "run" / "stage1_detector.pth").exists()


def test_aasist_torchrun_gradients_equal_one_process(tmp_path):
    """AASIST: two DDP ranks (gloo, CPU) take one step with the gradients of one process on the
    whole batch (dropout off so that both draw nothing at random; BatchNorm synchronised over the
    ranks). Here with the other torchrun tests, so that no two torchrun jobs run at once under
    pytest-xdist (two concurrent ones aborted a rank once)."""
    from test_aasist import tiny_aasist_dict

    arch = tiny_aasist_dict()
    arch["aasist"].update(graph_dropout=0.0, pool_dropout=0.0, branch_dropout=0.0, hidden_dropout=0.0)
    (tmp_path / "model.json").write_text(json.dumps(arch))
    _ok(_torchrun([str(REPO / "tests" / "dist_worker.py"), "grads", str(tmp_path)], timeout=180))
    g0, g1, single = (torch.load(tmp_path / f, weights_only=True)
                      for f in ("grads_rank0.pt", "grads_rank1.pt", "grads_single.pt"))
    assert g0.keys() == single.keys() and "GAT_layer_T.att_weight" in g0
    assert not any(".bn1." in k for k in g0)  # frozen, unused by the forward
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
        torch.testing.assert_close(g0[name], single[name], rtol=1e-3, atol=1e-6, msg=name)

"""Stage-1 training: products, checkpoint averaging, resume (also after SIGKILL), NaN guard,
early stopping, the evaluation report. Tiny detector, tiny synthetic corpus, seconds per run."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_model_dict
from xai_lib.data.datasets import TrainDataset
from xai_lib.config import Stage1Config, config_from_dict, config_to_dict, load_config
from xai_lib.detector.checkpoint import average_state_dicts, load_detector
from xai_lib.detector.model import Detector
from xai_lib.detector import training as stage1
from xai_lib.training import (
    BestCheckpoints,
    EarlyStopping,
    NonFiniteLossError,
    ResumeError,
    load_training_state,
)
from xai_lib.detector.training import STATE_NAME, stage1_report, train_stage1

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning OpenMP threads per process
    can make these runs 20-50x slower; one thread keeps each run to about a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(corpus: Path, **training) -> Stage1Config:
    """Tiny detector on the tiny corpus: 24 train utterances, global batch 8 -> 3 steps per epoch."""
    train = {"batch_size": 8, "eval_batch_size": 8, "num_epochs": 3, "optimizer": "adamw", "lr": 3e-3,
             "patience": 10, "keep_best": 2, "seed": 11, "device": "cpu"}
    train.update(training)
    return config_from_dict(
        {"model": tiny_model_dict(),
         "data": {"root": str(corpus), "format": "asvspoof2019", "crop_samples": 4000, "rawboost_algo": 0},
         "training": train},
        Stage1Config,
    )


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    return load_detector(path).state_dict()


@pytest.fixture
def epochs_run(monkeypatch) -> list[int]:
    """Records the epochs whose training data was drawn (0-based), i.e. the epochs trained."""
    seen: list[int] = []
    original = TrainDataset.set_epoch

    def spy(self, epoch):
        seen.append(int(epoch))
        return original(self, epoch)

    monkeypatch.setattr(TrainDataset, "set_epoch", spy)
    return seen


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1_run")
    cfg = make_cfg(tiny_corpus, num_epochs=4, keep_best=2)
    return cfg, run_dir, train_stage1(cfg, run_dir, progress=False)


# ----------------------------------------------------------------------------- products


def test_training_lowers_loss_and_writes_every_product(trained):
    cfg, run_dir, result = trained
    assert result.epochs_completed == 4 and len(result.history["train_loss"]) == 4
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    assert all(v > 0 for v in result.history["train_utts_per_s"])
    assert result.checkpoint == run_dir / "stage1_detector.pth"
    detector = load_detector(result.checkpoint)  # weights_only load + strict key check
    assert isinstance(detector, Detector) and not detector.training
    assert detector.load_report.extra["averaged_epochs"] == result.best_epochs
    # the resolved config round-trips
    assert config_to_dict(load_config(run_dir / "config_stage1.yaml", Stage1Config)) == config_to_dict(cfg)
    assert list((run_dir / "logs" / "stage1_detector").glob("events.out.tfevents.*"))
    best = json.loads((run_dir / "checkpoints" / "stage1" / "best.json").read_text())
    assert len(best) == 2
    # the kept epochs are the two lowest dev losses of the history
    dev = result.history["dev_loss"]
    assert sorted(e["epoch"] for e in best) == sorted(sorted(range(1, 5), key=lambda e: dev[e - 1])[:2])


def test_final_weights_are_the_average_of_the_kept_best_checkpoints(trained):
    _, run_dir, result = trained
    ckpt_dir = run_dir / "checkpoints" / "stage1"
    best = json.loads((ckpt_dir / "best.json").read_text())
    kept = [torch.load(ckpt_dir / e["file"], weights_only=True) for e in best]
    expected = average_state_dicts(kept)
    final = state_dict_of(result.checkpoint)
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(final[name], value), name
    assert not torch.equal(kept[0]["conformer.fc5.weight"], kept[1]["conformer.fc5.weight"])  # a real average
    # only the kept epochs stay on disk
    assert sorted(p.name for p in ckpt_dir.glob("epoch_*.pth")) == sorted(e["file"] for e in best)


def test_report_writes_scores_eer_per_attack_and_figures(trained):
    cfg, run_dir, result = trained
    metrics = stage1_report(load_detector(result.checkpoint), cfg, run_dir, result.history, progress=False)
    for split, n, attacks in (("dev", 16, {"A01", "A02", "A03", "A04"}), ("eval", 24, {"A01", "A04", "A05", "A06"})):
        lines = (run_dir / "scores" / f"{split}_scores.txt").read_text().split()
        assert len(lines) == 2 * n and metrics[f"{split}_num_utts"] == n
        assert 0.0 <= metrics[f"{split}_eer"] <= 1.0
        assert set(metrics[f"{split}_eer_per_attack"]) == attacks | {"pooled"}
        assert metrics[f"{split}_eer_per_attack"]["pooled"] == pytest.approx(metrics[f"{split}_eer"])
        assert (run_dir / "figures" / f"stage1_{split}_scores_det.png").stat().st_size > 1000
    assert (run_dir / "figures" / "stage1_loss_curves.png").is_file()


# ----------------------------------------------------------------------------- resume


def test_resume_continues_and_equals_an_uninterrupted_run(tiny_corpus, tmp_path, epochs_run):
    straight = train_stage1(make_cfg(tiny_corpus, num_epochs=3), tmp_path / "straight", progress=False)
    epochs_run.clear()
    first = train_stage1(make_cfg(tiny_corpus, num_epochs=2), tmp_path / "resumed", progress=False)
    assert first.epochs_completed == 2 and epochs_run == [0, 1]
    epochs_run.clear()
    resumed = train_stage1(make_cfg(tiny_corpus, num_epochs=3), tmp_path / "resumed", resume=True, progress=False)
    assert epochs_run == [2]  # finished epochs are not redone
    assert resumed.epochs_completed == 3
    for key in ("train_loss", "dev_loss"):
        assert resumed.history[key] == pytest.approx(straight.history[key], abs=1e-6), key
    assert resumed.best_epochs == straight.best_epochs
    a, b = state_dict_of(resumed.checkpoint), state_dict_of(straight.checkpoint)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_resume_after_sigkill_mid_epoch(tiny_corpus, tmp_path, epochs_run):
    """A run killed with SIGKILL during epoch 2 resumes at epoch 2 and ends like an uninterrupted run."""
    cfg = make_cfg(tiny_corpus, num_epochs=3, batch_size=2)  # 12 steps per epoch
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    run_dir = tmp_path / "run"
    state_path = run_dir / "checkpoints" / "stage1" / STATE_NAME
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "xai_lib.train", "stage1", "--config", str(cfg_path), "--run-dir", str(run_dir)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not state_path.exists():  # written atomically at the end of epoch 1
            assert proc.poll() is None, f"training exited early:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "epoch 1 did not finish in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    state = load_training_state(state_path)  # the last good state is intact
    assert state["epoch"] == 1, "the kill was meant to land during epoch 2"
    assert not (run_dir / "stage1_detector.pth").exists()

    epochs_run.clear()
    result = train_stage1(cfg, run_dir, resume=True, progress=False)
    assert epochs_run == [1, 2]  # epoch 1 was not redone; the interrupted epoch 2 was
    assert result.epochs_completed == cfg.training.num_epochs == 3  # as an uninterrupted run
    assert len(result.history["dev_loss"]) == 3
    assert load_detector(result.checkpoint).load_report.extra["epochs_completed"] == 3


def test_fresh_start_replaces_the_previous_runs_checkpoints(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train_stage1(make_cfg(tiny_corpus, num_epochs=2, keep_best=2), run_dir, progress=False)
    again = train_stage1(make_cfg(tiny_corpus, num_epochs=1, keep_best=2), run_dir, resume=False, progress=False)
    assert again.epochs_completed == 1 and again.best_epochs == [1]
    assert [p.name for p in (run_dir / "checkpoints" / "stage1").glob("epoch_*.pth")] == ["epoch_001.pth"]


def test_resume_refuses_a_state_of_another_architecture(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train_stage1(make_cfg(tiny_corpus, num_epochs=1), run_dir, progress=False)
    other = make_cfg(tiny_corpus, num_epochs=2)
    other.model.emb_size = 32
    with pytest.raises(ResumeError, match="different model architecture.*--no-resume"):
        train_stage1(other, run_dir, resume=True, progress=False)


# ----------------------------------------------------------------------------- NaN guard


def _nan_at_training_call(monkeypatch, bad_call: int) -> None:
    """Make the detector's ``bad_call``-th training-mode forward (0-based) return NaN logits."""
    original = Detector.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            if calls["n"] == bad_call:
                out.logits = out.logits * float("nan")
            calls["n"] += 1
        return out

    monkeypatch.setattr(Detector, "forward", forward)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_state(tiny_corpus, tmp_path, monkeypatch):
    _nan_at_training_call(monkeypatch, bad_call=4)  # epoch 2 (3 steps per epoch), its 2nd step
    run_dir = tmp_path / "run"
    state_path = run_dir / "checkpoints" / "stage1" / STATE_NAME
    with pytest.raises(NonFiniteLossError) as info:
        train_stage1(make_cfg(tiny_corpus, num_epochs=3), run_dir, progress=False)
    message = str(info.value)
    assert "nan" in message and "global step 4" in message and str(state_path) in message
    state = load_training_state(state_path)
    assert state["epoch"] == 1 and state["global_step"] == 3
    model = Detector(make_cfg(tiny_corpus).model)
    model.load_state_dict(state["model"])  # loadable, and untouched by the NaN step
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert not (run_dir / "stage1_detector.pth").exists()


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    _nan_at_training_call(monkeypatch, bad_call=0)
    with pytest.raises(NonFiniteLossError, match="global step 0.*no epoch had finished"):
        train_stage1(make_cfg(tiny_corpus, num_epochs=2), tmp_path / "run", progress=False)


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_after_patience_epochs_without_improvement(tiny_corpus, tmp_path, monkeypatch, epochs_run):
    dev_losses = iter([1.0, 0.9, 0.95, 0.97, 0.99, 0.5, 0.4])  # best at epoch 2, then 2 bad epochs

    def scripted_evaluation(*args, **kwargs):
        return next(dev_losses), {}, {}

    monkeypatch.setattr(stage1, "evaluate_detector", scripted_evaluation)
    cfg = make_cfg(tiny_corpus, num_epochs=7, patience=2, keep_best=2)
    result = train_stage1(cfg, tmp_path / "run", progress=False)
    assert result.stopped_early and result.epochs_completed == 4
    assert result.history["dev_loss"] == [1.0, 0.9, 0.95, 0.97]
    assert sorted(result.best_epochs) == [2, 3]  # the two lowest dev losses
    # resuming a run that stopped early trains nothing more
    epochs_run.clear()
    again = train_stage1(cfg, tmp_path / "run", resume=True, progress=False)
    assert epochs_run == [] and again.epochs_completed == 4 and again.stopped_early


def test_early_stopping_and_best_checkpoints_units(tmp_path):
    stop = EarlyStopping(patience=2)
    assert [stop.step(v) for v in (1.0, 0.5, 0.6, 0.5)] == [True, True, False, False]
    assert stop.should_stop
    assert not EarlyStopping(patience=1).step(float("nan"))

    best = BestCheckpoints(tmp_path, keep=2)
    for epoch, loss in enumerate([0.9, 0.5, 0.7, float("nan"), 0.6], start=1):
        best.consider(loss, epoch, {"w": torch.full((2,), float(epoch))})
    assert [(e["epoch"], e["loss"]) for e in best.entries] == [(2, 0.5), (5, 0.6)]
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pth")) == ["epoch_002.pth", "epoch_005.pth"]
    reopened = BestCheckpoints(tmp_path, keep=2)  # a resumed run reads the index
    assert reopened.entries == best.entries
    reopened.drop_after(4)  # epoch 5 was saved by an epoch that a resumed run redoes
    assert [e["epoch"] for e in reopened.entries] == [2]
    assert not (tmp_path / "epoch_005.pth").exists()


# ----------------------------------------------------------------------------- learning-rate schedule


def test_lr_schedule_curves():
    lr, total = 1e-3, 20
    assert [stage1.scheduled_lr(i, total, lr) for i in range(total)] == [lr] * total  # the default
    # cosine: linear warm-up over 4 steps, half a cosine down to lr * min_lr_ratio at the last step
    cos = [stage1.scheduled_lr(i, total, lr, "cosine", warmup_steps=4, min_lr_ratio=0.1) for i in range(total)]
    assert cos[:4] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])
    assert cos[4] == pytest.approx(lr) and cos[-1] == pytest.approx(0.1 * lr)
    assert all(a > b for a, b in zip(cos[4:], cos[5:]))  # decreasing after the warm-up
    assert stage1.scheduled_lr(total + 5, total, lr, "cosine", 4, 0.1) == pytest.approx(0.1 * lr)  # past the end
    # cosine with decay_steps: warm-up, lr held, then the decay over the last 5 steps only
    held = [stage1.scheduled_lr(i, total, lr, "cosine", 2, 0.0, decay_steps=5) for i in range(total)]
    assert held[:16] == pytest.approx([lr / 2] + [lr] * 15)
    assert held[16:] == pytest.approx([lr * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(1, 5)])
    # onecycle: torch's OneCycleLR curve (cosine, no momentum cycling)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25,
                                                cycle_momentum=False, final_div_factor=1 / (25 * 0.01))
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    one = [stage1.scheduled_lr(i, total, lr, "onecycle", warmup_steps=0.25 * total, min_lr_ratio=0.01)
           for i in range(total)]
    assert one == pytest.approx(expected, rel=1e-9)


def lrs_of_steps(monkeypatch) -> list[float]:
    """Records the learning rate of every AdamW step."""
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen


def test_training_follows_the_schedule_and_a_resumed_run_continues_it(tiny_corpus, tmp_path, monkeypatch):
    lrs = lrs_of_steps(monkeypatch)
    train_stage1(make_cfg(tiny_corpus, num_epochs=2), tmp_path / "constant", progress=False)
    assert lrs == [3e-3] * 6  # constant (the default): unchanged

    sched = {"num_epochs": 3, "lr_schedule": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.0}
    expected = [stage1.scheduled_lr(i, 9, 3e-3, "cosine", 3, 0.0) for i in range(9)]  # 3 steps per epoch
    lrs.clear()
    straight = train_stage1(make_cfg(tiny_corpus, **sched), tmp_path / "straight", progress=False)
    assert lrs == pytest.approx(expected) and lrs[2] == pytest.approx(3e-3) and lrs[-1] == 0.0

    original = TrainDataset.set_epoch

    def interrupt_at_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    lrs.clear()
    monkeypatch.setattr(TrainDataset, "set_epoch", interrupt_at_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_stage1(make_cfg(tiny_corpus, **sched), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(TrainDataset, "set_epoch", original)
    resumed = train_stage1(make_cfg(tiny_corpus, **sched), tmp_path / "resumed", resume=True, progress=False)
    assert lrs == pytest.approx(expected)  # the resumed epoch continues the curve
    assert resumed.history["train_loss"] == pytest.approx(straight.history["train_loss"], abs=1e-6)


def test_dev_scored_only_over_the_last_epochs(tiny_corpus, tmp_path):
    assert [e for e in range(1, 11) if stage1._dev_scored(e, 10, last_epochs=3)] == [8, 9, 10]
    assert [e for e in range(1, 6) if stage1._dev_scored(e, 5)] == [1, 2, 3, 4, 5]  # the default
    assert [e for e in range(1, 3) if stage1._dev_scored(e, 2, last_epochs=5)] == [1, 2]
    cfg = make_cfg(tiny_corpus, num_epochs=4, dev_last_epochs=2, keep_best=3)
    result = train_stage1(cfg, tmp_path / "run", progress=False)
    dev = result.history["dev_loss"]
    assert [e + 1 for e, v in enumerate(dev) if v == v] == [3, 4]  # NaN: not scored
    assert sorted(result.best_epochs) == [3, 4]  # only scored epochs are averaged

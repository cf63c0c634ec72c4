"""Stage 2 finds its detector: explicit path > run_dir/stage1_detector.pth > avg_5_best.pth fallback,
else one clear "No Stage 1 model found" error listing every place looked at and the remedies."""
from __future__ import annotations

from pathlib import Path

import pytest

import xai_lib.importance.training as stage2
from xai_lib.config import Stage2Config, load_config
from xai_lib.importance.training import NoStage1ModelError, resolve_detector, train_stage2


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A run dir, a working directory and a stand-in project root, all empty."""
    run_dir, cwd, project = tmp_path / "run", tmp_path / "cwd", tmp_path / "project"
    for d in (run_dir, cwd, project):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(stage2, "PROJECT_ROOT", project)
    return run_dir, cwd, project


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"checkpoint")
    return path


def test_explicit_path_wins_over_run_dir_and_fallback(places, tmp_path):
    run_dir, cwd, _ = places
    explicit = _touch(tmp_path / "elsewhere" / "my_detector.pth")
    _touch(run_dir / "stage1_detector.pth")
    _touch(cwd / "avg_5_best.pth")
    assert resolve_detector(str(explicit), run_dir) == explicit


def test_run_dir_detector_wins_over_fallback(places):
    run_dir, cwd, project = places
    in_run = _touch(run_dir / "stage1_detector.pth")
    _touch(cwd / "avg_5_best.pth")
    _touch(project / "avg_5_best.pth")
    assert resolve_detector(None, run_dir) == in_run.resolve()
    assert resolve_detector("", run_dir) == in_run.resolve()  # the notebook's empty parameter


def test_fallback_is_looked_up_in_cwd_then_project_root(places):
    run_dir, cwd, project = places
    in_project = _touch(project / "avg_5_best.pth")
    assert resolve_detector(None, run_dir) == in_project.resolve()
    in_cwd = _touch(cwd / "avg_5_best.pth")
    assert resolve_detector(None, run_dir) == in_cwd.resolve()
    custom = _touch(cwd / "weights" / "tcm.pth")
    assert resolve_detector(None, run_dir, fallback="weights/tcm.pth") == custom.resolve()


def test_missing_explicit_path_is_an_error_naming_it(places):
    run_dir, cwd, _ = places
    _touch(run_dir / "stage1_detector.pth")  # an explicit path is never silently replaced
    with pytest.raises(NoStage1ModelError) as info:
        resolve_detector("typo/detector.pth", run_dir)
    message = str(info.value)
    assert message.startswith("No Stage 1 model found")
    assert "typo/detector.pth" in message


def test_nothing_found_lists_every_place_and_both_remedies(places):
    run_dir, cwd, project = places
    with pytest.raises(NoStage1ModelError) as info:
        resolve_detector(None, run_dir)
    message = str(info.value)
    assert message.startswith("No Stage 1 model found")
    for place in (run_dir / "stage1_detector.pth", cwd / "avg_5_best.pth", project / "avg_5_best.pth"):
        assert str(place.resolve()) in message
    # remedy 1: train Stage 1 (pipeline or notebook 01) into this run directory
    assert f"python -m xai_lib.pipeline --stage1 --run-dir {run_dir}" in message
    assert "notebooks/01_detector_training.ipynb" in message
    # remedy 2: copy a checkpoint to the run dir or the fallback; published state dicts need detector.config
    assert f"{run_dir / 'stage1_detector.pth'}" in message
    assert "avg_5_best.pth" in message and "detector.config" in message
    assert isinstance(info.value, FileNotFoundError)


def test_train_stage2_fails_before_training_without_a_detector(places, tiny_corpus):
    run_dir, _, _ = places
    cfg = load_config({"data": {"root": str(tiny_corpus)}}, Stage2Config)
    with pytest.raises(NoStage1ModelError, match="No Stage 1 model found"):
        train_stage2(cfg, run_dir, progress=False)
    assert list(run_dir.iterdir()) == []  # nothing was written

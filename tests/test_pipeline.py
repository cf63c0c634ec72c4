"""The papermill pipeline runner and run-directory safety, on small FAKE notebooks.

The fake notebooks declare the parameter contract of the real 01/02/03 in a cell tagged
``parameters``, record what they received (``params_stageN.json``), write tiny products and
merge their key into ``run_dir/metrics.json`` — so every papermill execution takes about
half a second. Kept few: the whole file runs in seconds.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from xai_lib.pipeline import main
from xai_lib.runs import RunDirectory, RunDirectoryBusyError, RunLock, pid_alive

# ----------------------------------------------------------------------------- fake notebooks

_PARAMS = {
    1: [
        ('config_path: str = ""', "Stage-1 YAML"),
        ("overrides: list = []", "dotted overrides"),
        ('data_root: str = ""', "database root"),
        ('run_dir: str = "outputs/nb"', "run directory"),
        ("batch_size: int = 32", "utterances per step"),
        ("num_epochs: int = 30", "maximum epochs"),
        ("smoke: bool = False", "seconds-long run"),
        ("seed: int = 1234", "random seed"),
    ],
    2: [
        ('stage1_checkpoint: str = ""', "detector; empty = resolve"),
        ('config_path: str = ""', "Stage-2 YAML"),
        ("overrides: list = []", "dotted overrides"),
        ('data_root: str = ""', "database root"),
        ('run_dir: str = "outputs/nb"', "run directory"),
        ('prototype_mode: str = "ema"', "ema | fixed | learnable"),
        ("lambda_fidelity: float = 1.0", "fidelity weight"),
        ("batch_size: int = 24", "utterances per step"),
        ("num_epochs: int = 50", "maximum epochs"),
        ("smoke: bool = False", "seconds-long run"),
        ("seed: int = 1234", "random seed"),
    ],
    3: [
        ('stage1_checkpoint: str = ""', "detector"),
        ('stage2_checkpoint: str = ""', "XAI module"),
        ('data_root: str = ""', "database root"),
        ('methods: list = ["importance", "saliency"]', "attribution methods"),
        ("num_utterances: int = 8", "utterances to explain"),
        ('run_dir: str = "outputs/nb"', "run directory"),
        ("smoke: bool = False", "seconds-long run"),
        ("seed: int = 1234", "random seed"),
    ],
}

_COMMON = '''
import json, os
from pathlib import Path
rd = Path(run_dir)
rd.mkdir(parents=True, exist_ok=True)
received = {{k: globals()[k] for k in {names!r}}}
received["cwd"] = os.getcwd()
received["held_locks"] = os.environ.get("XAI_LIB_HELD_RUN_LOCKS", "")
(rd / "params_stage{n}.json").write_text(json.dumps(received))

def merge(key, value):
    path = rd / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {{}}
    data[key] = value
    path.write_text(json.dumps(data))
'''

_BODY = {
    1: '''
(rd / "stage1_detector.pth").write_text("fake detector")
merge("stage1", {"dev_eer": 0.05, "eval_eer": 0.08, "epochs_completed": num_epochs})
''',
    2: '''
detector = Path(stage1_checkpoint) if stage1_checkpoint else rd / "stage1_detector.pth"
if not detector.exists():
    raise FileNotFoundError(f"No Stage 1 model found: {detector}")
(rd / "stage2_xai.pth").write_text(f"xai on {detector}")
merge("stage2", {"prototype_mode": prototype_mode, "dev_loss": 0.5, "detector": str(detector)})
''',
    3: '''
mode = json.loads((rd / "metrics.json").read_text())["stage2"]["prototype_mode"]
offset = {"ema": 0.0, "fixed": 0.25}.get(mode, 0.5)
merge("stage3", {"methods": {m: {"deletion_auc": 0.1 + offset + 0.01 * i, "insertion_auc": 0.9 - offset,
                                 "loc_auc": 0.7, "loc_eer": 0.3, "pointing_game": 0.5, "ms_per_utt": 1.5}
                             for i, m in enumerate(methods)}})
''',
}
_FAILING_BODY_2 = '''
stage_two_result = 1
raise ValueError("boom in stage 2")
'''
_NAMES = {1: "01_detector_training.ipynb", 2: "02_xai_training.ipynb", 3: "03_attribution_visualization.ipynb"}


def _write_notebook(path: Path, n: int, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("\n".join(f"{code}  # {help_}" for code, help_ in _PARAMS[n]))
    params.metadata["tags"] = ["parameters"]
    names = [code.split(":")[0] for code, _ in _PARAMS[n]]
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# fake stage {n}"),
        params,
        nbformat.v4.new_code_cell(_COMMON.format(names=names, n=n)),
        nbformat.v4.new_code_cell(body),
    ]
    nbformat.write(nb, path)


def make_notebooks(folder: Path, fail_stage2: bool = False) -> Path:
    """Three fake notebooks following the parameter contract; optionally a failing Stage 2."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in (1, 2, 3):
        body = _FAILING_BODY_2 if (n == 2 and fail_stage2) else _BODY[n]
        _write_notebook(folder / _NAMES[n], n, body)
    return folder


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory) -> Path:
    return make_notebooks(tmp_path_factory.mktemp("notebooks"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def received(run_dir: Path, n: int) -> dict:
    return json.loads((run_dir / f"params_stage{n}.json").read_text())


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def statuses(run_dir: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in record(run_dir)["stages"].items()}


# ----------------------------------------------------------------------------- full run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, notebooks):
    """One full 01 -> 02 -> 03 run with -p/--override/--smoke (shared by several tests)."""
    base = tmp_path_factory.mktemp("full")
    run_dir = base / "run"
    cfg1, cfg2 = base / "stage1.yaml", base / "stage2.yaml"
    cfg1.write_text("training: {batch_size: 4}\n")
    cfg2.write_text("xai: {prototype_mode: ema}\n")
    # capsys is function-scoped: capture this module-scoped run by hand
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([
            "--no-progress", "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks), "--cwd", str(base),
            "--config-stage1", str(cfg1), "--config-stage2", str(cfg2), "--smoke",
            "-p", "seed", "7", "-p", "batch_size", "4", "-p", "methods", "[importance, integrated_gradients]",
            "--override", "training.lr=1e-4",
        ])
    return code, out.getvalue(), err.getvalue(), run_dir, base


def test_full_run_executes_three_notebooks_in_order(full_run):
    code, out, err, run_dir, base = full_run
    assert code == 0, err
    for name in _NAMES.values():
        executed = nbformat.read(run_dir / "notebooks" / name, as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    rec = record(run_dir)
    assert rec["status"] == "finished"
    assert statuses(run_dir) == {"stage1": "ok", "stage2": "ok", "stage3": "ok"}
    for key, entry in rec["stages"].items():
        assert entry["duration_s"] >= 0 and Path(entry["notebook"]).is_file()
    assert rec["versions"]["python"] and "torch" in rec["versions"] and rec["started"] and rec["ended"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"stage1", "stage2", "stage3"}
    # the input configs are kept with the run; the kernels ran in --cwd
    assert (run_dir / "configs" / "stage1.yaml").is_file() and (run_dir / "configs" / "stage2.yaml").is_file()
    assert received(run_dir, 1)["cwd"] == str(base)
    # the kernels work under the runner's lock (training code may take it as "inherited")
    assert str(run_dir / ".lock") in received(run_dir, 1)["held_locks"] and not (run_dir / ".lock").exists()
    # the order: stage 2 found the detector stage 1 wrote
    assert metrics["stage2"]["detector"] == str(run_dir / "stage1_detector.pth")
    # the summary on stdout
    assert "metrics.json summary" in out and "integrated_gradients" in out and "dev_eer" in out


def test_parameters_reach_only_the_notebooks_that_declare_them(full_run):
    code, out, err, run_dir, base = full_run
    p1, p2, p3 = (received(run_dir, n) for n in (1, 2, 3))
    assert p1["seed"] == p2["seed"] == p3["seed"] == 7  # declared by all three
    assert p1["batch_size"] == p2["batch_size"] == 4  # not declared by 03
    assert p3["methods"] == ["importance", "integrated_gradients"]
    assert p1["smoke"] and p2["smoke"] and p3["smoke"]
    assert p1["config_path"] == str(base / "stage1.yaml") and p2["config_path"] == str(base / "stage2.yaml")
    assert p1["overrides"] == p2["overrides"] == ["training.lr=1e-4"]
    assert p2["stage1_checkpoint"] == "" and p1["run_dir"] == str(run_dir)
    injected = [c for c in nbformat.read(run_dir / "notebooks" / _NAMES[1], as_version=4).cells
                if "injected-parameters" in c.metadata.get("tags", [])][0]
    assert "methods" not in injected.source and "stage1_checkpoint" not in injected.source


def test_finished_run_is_not_overwritten_without_overwrite(full_run, notebooks, capsys):
    code, out, err, run_dir, base = full_run
    before = (run_dir / "run.json").read_text()
    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks))
    assert code == 2
    assert "--overwrite" in err and "another --run-dir" in err and "Stage 1" in err
    assert (run_dir / "run.json").read_text() == before  # untouched

    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks),
                             "--stage3", "--overwrite", "-p", "methods", "[saliency]")
    assert code == 0, err
    rec = record(run_dir)
    assert rec["stages"]["stage3"]["status"] == "ok" and rec["stages"]["stage1"]["status"] == "ok"
    assert rec["history"][-1]["stages_requested"] == [1, 2, 3]  # the earlier run is kept in run.json
    assert list(json.loads((run_dir / "metrics.json").read_text())["stage3"]["methods"]) == ["saliency"]


def test_undeclared_or_mistyped_parameter_is_refused_before_anything_runs(notebooks, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks),
                             "-p", "learning_rate", "0.1")
    assert code == 2 and "learning_rate" in err and "no notebook declares" in err
    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks),
                             "-p", "num_utterances", "many")
    assert code == 2 and "num_utterances: int" in err
    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks),
                             "--sweep", "not_a_key=1,2")
    assert code == 2 and "not_a_key" in err
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- stage selection


def test_stage2_added_to_an_earlier_stage1_run(notebooks, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # a stale lock (dead pid) left by a crashed run is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "hostname": socket.gethostname(),
                                               "started": "2020-01-01T00:00:00", "command": "crashed"}))
    common = ("--run-dir", str(run_dir), "--notebooks-dir", str(notebooks), "--cwd", str(tmp_path))
    code, out, err = run_cli(capsys, *common, "--stage1")
    assert code == 0, err
    assert statuses(run_dir) == {"stage1": "ok", "stage2": "skipped", "stage3": "skipped"}
    assert not (run_dir / ".lock").exists()

    code, out, err = run_cli(capsys, *common, "--stage2")
    assert code == 0, err
    assert statuses(run_dir) == {"stage1": "ok", "stage2": "ok", "stage3": "skipped"}
    assert received(run_dir, 2)["stage1_checkpoint"] == ""  # the notebook resolves run_dir/stage1_detector.pth
    assert not (run_dir / "params_stage3.json").exists()
    assert record(run_dir)["stages"]["stage1"]["from_earlier_run"]

    code, out, err = run_cli(capsys, *common, "--stage2")  # its product now exists
    assert code == 2 and "--overwrite" in err


def test_failing_stage_stops_the_chain(tmp_path, capsys):
    bad = make_notebooks(tmp_path / "bad_notebooks", fail_stage2=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stage1_detector.pth").write_text("detector from elsewhere")
    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(bad), "--stage2", "--stage3")
    assert code == 1
    executed = run_dir / "notebooks" / _NAMES[2]
    assert "STAGE 2 FAILED" in err and str(executed) in err
    assert 'raise ValueError("boom in stage 2")' in err and "ValueError: boom in stage 2" in err
    assert executed.is_file()
    rec = record(run_dir)
    assert rec["status"] == "failed"
    assert statuses(run_dir) == {"stage1": "skipped", "stage2": "failed", "stage3": "not run"}
    assert rec["stages"]["stage2"]["error"]["ename"] == "ValueError"
    assert not (run_dir / "params_stage3.json").exists() and not (run_dir / ".lock").exists()

    # a failed stage may be re-run without --overwrite once fixed
    good = make_notebooks(tmp_path / "good_notebooks")
    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(good), "--stage2")
    assert code == 0, err
    assert statuses(run_dir)["stage2"] == "ok"


# ----------------------------------------------------------------------------- sweep


def test_sweep_runs_stage1_once_and_compares_values(notebooks, tmp_path, capsys):
    run_dir = tmp_path / "sweep_run"
    code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks),
                             "--sweep", "prototype_mode=ema,fixed")
    assert code == 0, err
    detector = run_dir / "stage1_detector.pth"
    assert detector.is_file() and statuses(run_dir)["stage1"] == "ok"
    for value in ("ema", "fixed"):
        sub = run_dir / "sweep" / f"prototype_mode={value}"
        assert received(sub, 2)["prototype_mode"] == value
        assert received(sub, 2)["stage1_checkpoint"] == received(sub, 3)["stage1_checkpoint"] == str(detector)
        assert not (sub / "stage1_detector.pth").exists()  # one detector for all values
        assert statuses(sub) == {"stage1": "skipped", "stage2": "ok", "stage3": "ok"}
    table = (run_dir / "sweep" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ema |") or line.startswith("| fixed |")]
    assert len(rows) == 4  # 2 values x 2 methods
    assert "| ema | importance | 0.1 |" in table and "| fixed | importance | 0.35 |" in table
    assert (run_dir / "sweep" / "comparison.png").stat().st_size > 1000
    assert record(run_dir)["sweep"]["runs"]["fixed"]["status"] == "finished"


# ----------------------------------------------------------------------------- run-directory locks


def test_run_directory_held_by_a_live_process_is_refused(notebooks, tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = RunDirectory(run_dir).acquire()  # this (live) process holds it through another object
    try:
        code, out, err = run_cli(capsys, "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks))
        assert code == 2 and "in use by another live process" in err and f"pid {os.getpid()}" in err
        assert not (run_dir / "run.json").exists()
        # a different run directory is not affected
        with RunDirectory(tmp_path / "other") as other:
            assert other.held
    finally:
        holder.release()
    assert not (run_dir / ".lock").exists()


def test_lock_of_a_live_child_is_refused_and_taken_over_once_it_dies(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    child = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": child.pid, "hostname": socket.gethostname(),
                                                   "started": "now", "command": "sleep 60"}))
        with pytest.raises(RunDirectoryBusyError, match=f"pid {child.pid}"):
            RunDirectory(run_dir).acquire()
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)
    with RunDirectory(run_dir) as run:
        assert RunLock.read(run.lock_path).pid == os.getpid()


def test_lock_from_another_host_is_refused_with_a_hint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": 1, "hostname": "some-other-node", "started": "x"}))
    with pytest.raises(RunDirectoryBusyError, match="another machine"):
        RunDirectory(run_dir).acquire()


def _race(path: str, barrier, results) -> None:
    run = RunDirectory(path)
    barrier.wait()
    try:
        run.acquire()
        results.put("won")
    except RunDirectoryBusyError:
        results.put("refused")
    barrier.wait()  # hold the lock until everybody has tried
    run.release()


def test_only_one_of_several_processes_takes_over_a_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "hostname": socket.gethostname(), "started": "x"}))
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(run_dir), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]


# ----------------------------------------------------------------------------- demo and sweep table


def test_demo_generates_the_corpus_and_keeps_the_previous_demo(notebooks, tmp_path, capsys, monkeypatch):
    import types

    calls = []

    def fake_generate_corpus(out, seed, size, **kwargs):
        calls.append((Path(out), seed, size))
        (Path(out) / "ASVspoof2019_LA_cm_protocols").mkdir(parents=True)

    monkeypatch.setitem(sys.modules, "xai_lib.data.synthetic",
                        types.SimpleNamespace(generate_corpus=fake_generate_corpus))
    old = tmp_path / "outputs" / "demo"
    old.mkdir(parents=True)
    (old / "run.json").write_text(json.dumps({"status": "finished", "stages": {}}))
    (old / "metrics.json").write_text(json.dumps({"stage1": {"dev_eer": 0.5}}))

    code, out, err = run_cli(capsys, "--demo", "--notebooks-dir", str(notebooks), "--cwd", str(tmp_path))
    assert code == 0, err
    corpus = tmp_path / "outputs" / "data" / "demo_corpus"
    assert calls == [(corpus, 0, "demo")]
    archived = [p for p in (tmp_path / "outputs").iterdir() if p.name.startswith("demo-")]
    assert len(archived) == 1 and json.loads((archived[0] / "metrics.json").read_text())["stage1"]["dev_eer"] == 0.5
    assert statuses(old) == {"stage1": "ok", "stage2": "ok", "stage3": "ok"}
    assert received(old, 1)["data_root"] == received(old, 3)["data_root"] == str(corpus)
    assert received(old, 1)["config_path"].endswith("configs/demo.yaml")
    assert "make lab" in out and "tensorboard --logdir" in out and str(archived[0]) in out


def test_sweep_comparison_lists_a_value_without_results(tmp_path):
    from xai_lib.pipeline import write_sweep_comparison

    ok = tmp_path / "sweep" / "lambda_fidelity=0"
    ok.mkdir(parents=True)
    (ok / "metrics.json").write_text(json.dumps(
        {"stage3": {"methods": {"importance": {"deletion_auc": 0.2, "insertion_auc": 0.8}}}}))
    md, png = write_sweep_comparison(tmp_path / "sweep", "lambda_fidelity", ["0", "1.0"])
    text = md.read_text()
    assert "| 0 | importance | 0.2 | 0.8 | – |" in text
    assert "| 1.0 | (no Stage-3 metrics" in text
    assert png is not None and png.is_file()


def test_child_processes_of_the_holder_may_work_in_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    probe = ("import sys; from xai_lib.runs import RunDirectory, RunDirectoryBusyError\n"
             "r = RunDirectory(sys.argv[1])\n"
             "try:\n    r.acquire(); print('inherited' if r.lock.inherited else 'own'); r.release()\n"
             "except RunDirectoryBusyError:\n    print('refused')\n")
    with RunDirectory(run_dir):
        child = subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True)
        env = {k: v for k, v in os.environ.items() if k != "XAI_LIB_HELD_RUN_LOCKS"}
        stranger = subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True, env=env)
        assert (run_dir / ".lock").exists()  # the child's release left the parent's lock alone
    assert child.stdout.strip() == "inherited", child.stderr
    assert stranger.stdout.strip() == "refused", stranger.stderr
    assert "XAI_LIB_HELD_RUN_LOCKS" not in os.environ and not (run_dir / ".lock").exists()


def test_metrics_json_is_strict_json_with_unscored_values_as_null(tmp_path):
    """An epoch whose dev set was not scored (NaN in the history) is ``null`` in metrics.json, which
    strict readers (jq, browsers: no ``NaN``) parse; other stages' keys are kept."""
    import numpy as np

    from xai_lib.runs import merge_metrics

    merge_metrics(tmp_path, "stage2", {"f1": 0.5})
    merge_metrics(tmp_path, "stage1", {"history": {"dev_eer": [float("nan"), 0.01]}, "eer": np.float32(0.25),
                                       "inf": float("inf")})
    text = (tmp_path / "metrics.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
    assert data["stage1"]["history"]["dev_eer"] == [None, 0.01]
    assert data["stage1"]["eer"] == 0.25 and data["stage1"]["inf"] is None
    assert data["stage2"] == {"f1": 0.5}

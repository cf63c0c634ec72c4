"""Fault injection, configuration and runs: bad configs stop before any work, a run directory is
never partially overwritten, a killed run says where it stopped, and a 10-minute file is scored
in bounded memory.

Already covered elsewhere (not repeated here): unknown keys, wrong types, negative lr,
temperature 0, unknown prototype_mode (tests/test_config.py), undeclared/mistyped notebook
parameters (test_pipeline.py::test_undeclared_or_mistyped_parameter_is_refused_before_anything_runs),
a stage that raises (test_pipeline.py::test_failing_stage_stops_the_chain: run.json names the failed
stage and the error), live and stale locks (test_pipeline.py::test_run_directory_held_by_a_live_process_is_refused,
::test_stage2_added_to_an_earlier_stage1_run), Stage-1 resume with another architecture
(test_stage1_training.py::test_resume_refuses_a_state_of_another_architecture).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import soundfile as sf

from xai_lib.config import ConfigError, Stage1Config, Stage2Config, load_config
from xai_lib.pipeline import main

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "schema,override,key",
    [
        (Stage1Config, "training.lr=.inf", "training.lr"),
        (Stage1Config, "training.weight_decay=.nan", "training.weight_decay"),
        (Stage1Config, "training.class_weights=[.nan, 0.9]", "training.class_weights[0]"),
        (Stage2Config, "xai.lambda_sparsity=.nan", "xai.lambda_sparsity"),
        (Stage2Config, "xai.temperature=.inf", "xai.temperature"),
        (Stage1Config, "data.max_eval_seconds=.nan", "data.max_eval_seconds"),
        (Stage1Config, "data.max_train_utts=0", "data.max_train_utts"),
        (Stage1Config, "data.eval_crop_samples=100", "data.eval_crop_samples"),
        (Stage1Config, "data.num_workers=-1", "data.num_workers"),
        (Stage1Config, "training.grad_clip=-1", "training.grad_clip"),
        (Stage2Config, "training.max_steps_per_epoch=0", "training.max_steps_per_epoch"),
        (Stage1Config, "training.device=gpu", "training.device"),
        (Stage1Config, "model.ssl.hidden_size=-32", "model.ssl.hidden_size"),
        (Stage1Config, "model.ssl.conv_stride=[0, 2, 2, 2, 2, 2, 2]", "model.ssl.conv_stride"),
        (Stage1Config, "model.ff_mult=0", "model.ff_mult"),
    ],
)
def test_non_finite_and_out_of_range_values_name_the_key(tmp_path, schema, override, key):
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, schema, [override])
    assert str(path) in str(err.value) and key in str(err.value)


@pytest.mark.parametrize("override", ["training.lr=-1e-4", "xai.temperature=0", "xai.prototype_mode=median",
                                      "training.weight_decay=.nan", "training.bach_size=4"])
def test_pipeline_refuses_a_bad_config_before_anything_runs(tmp_path, capsys, override):
    run_dir = tmp_path / "run"
    code = main(["--no-progress", "--run-dir", str(run_dir), "--cwd", str(ROOT), "--override", override])
    err = capsys.readouterr().err
    assert code == 2 and override.split("=")[0] in err
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- run directories


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('run_dir: str = "outputs/nb"  # run directory')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


_PRODUCT = '''
import json, os
from pathlib import Path
rd = Path(run_dir)
(rd / "stage{n}_product.txt").write_text("done")
path = rd / "metrics.json"
data = json.loads(path.read_text()) if path.exists() else {{}}
data["stage{n}"] = {{"ok": True}}
path.write_text(json.dumps(data))
'''
_SLOW = '''
import os, time
from pathlib import Path
rd = Path(run_dir)
(rd / "started").write_text(str(os.getpid()))
for _ in range(600):  # at most 60 s; the test ends it sooner
    if (rd / "stop").exists():
        break
    time.sleep(0.1)
'''
_NAMES = {1: "01_detector_training.ipynb", 2: "02_xai_training.ipynb", 3: "03_attribution_visualization.ipynb"}


def _notebooks(folder: Path, slow_stage1: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in _NAMES.items():
        _notebook(folder / name, _SLOW if (n == 1 and slow_stage1) else _PRODUCT.format(n=n))
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _finished_run(run_dir: Path, with_record: bool) -> None:
    """A run directory holding Stage-1..3 products (with or without the runner's run.json)."""
    (run_dir / "notebooks").mkdir(parents=True)
    (run_dir / "stage1_detector.pth").write_bytes(b"detector bytes")
    (run_dir / "stage2_xai.pth").write_bytes(b"xai bytes")
    (run_dir / "metrics.json").write_text(json.dumps({"stage1": {"dev_eer": 0.1}, "stage2": {}, "stage3": {}}))
    (run_dir / "notebooks" / _NAMES[1]).write_text("{}")
    if with_record:
        stages = {f"stage{n}": {"status": "ok"} for n in (1, 2, 3)}
        (run_dir / "run.json").write_text(json.dumps({"status": "finished", "stages": stages}))
    past = time.time() - 3600  # an hour old: any rewrite would show in the mtimes
    for p in run_dir.rglob("*"):
        os.utime(p, (past, past))


@pytest.mark.parametrize("case", ["finished run.json", "products without run.json", "held by a live process"])
def test_a_second_run_never_touches_the_first_runs_files(tmp_path, capsys, case):
    run_dir, notebooks = tmp_path / "run", _notebooks(tmp_path / "nb")
    _finished_run(run_dir, with_record=case != "products without run.json")
    holder = None
    if case == "held by a live process":
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (run_dir / ".lock").write_text(json.dumps({"pid": holder.pid, "hostname": os.uname().nodename,
                                                   "started": "2020-01-01T00:00:00", "command": "first run"}))
    before = _snapshot(run_dir)
    try:
        for stages in ([], ["--stage1"], ["--stage2", "--stage3"]):
            code = main(["--no-progress", "--run-dir", str(run_dir), "--notebooks-dir", str(notebooks),
                         "--cwd", str(tmp_path), *stages])
            assert code == 2, capsys.readouterr().err
            err = capsys.readouterr().err
            assert ("another --run-dir" in err) if holder is None else (str(holder.pid) in err)
            assert _snapshot(run_dir) == before  # same files, same bytes, same mtimes
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def _start_slow_pipeline(tmp_path: Path, run_dir: Path) -> tuple[subprocess.Popen, int]:
    """A pipeline whose Stage 1 is busy; returns it and its kernel's pid once the stage runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xai_lib.pipeline", "--no-progress", "--stage1", "--run-dir", str(run_dir),
         "--notebooks-dir", str(_notebooks(tmp_path / "slow_nb", slow_stage1=True)), "--cwd", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 90
    while not (run_dir / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "stage 1 never started"
        time.sleep(0.1)
    return proc, int((run_dir / "started").read_text())


def _stop_kernel(run_dir: Path, kernel_pid: int) -> None:
    (run_dir / "stop").write_text("")  # the busy cell ends within 0.1 s
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(kernel_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(kernel_pid, signal.SIGKILL)


def test_killed_pipeline_leaves_run_json_saying_where_and_is_resumed_without_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc, kernel = _start_slow_pipeline(tmp_path, run_dir)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate()
    _stop_kernel(run_dir, kernel)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "running" and record["pid"] == proc.pid  # the record says who died
    assert record["stages"]["stage1"]["status"] == "running"  # ... in which stage
    assert (run_dir / ".lock").exists()  # a stale lock: its process is gone

    code = main(["--no-progress", "--run-dir", str(run_dir), "--notebooks-dir", str(_notebooks(tmp_path / "nb")),
                 "--cwd", str(tmp_path), "--stage1"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stages"]["stage1"]["status"] == "ok" and record["history"][-1]["status"] == "running"
    assert not (run_dir / ".lock").exists()


def test_terminated_pipeline_records_the_interrupted_stage_as_failed(tmp_path):
    run_dir = tmp_path / "run"
    proc, kernel = _start_slow_pipeline(tmp_path, run_dir)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        _stop_kernel(run_dir, kernel)
    assert proc.returncode == 130, err
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["stages"]["stage1"]["status"] == "failed"
    assert record["stages"]["stage1"]["error"]["ename"] == "KeyboardInterrupt"
    assert not (run_dir / ".lock").exists()


# ----------------------------------------------------------------------------- long inputs

_LONG_SCORING = r'''
import json, resource, sys
import torch
torch.set_num_threads(1)
from xai_lib.config import ModelConfig, Stage1Config, config_from_dict, load_config
from xai_lib.data.protocols import Utterance
from xai_lib.detector.model import Detector
from xai_lib.detector.training import score_utterances

arch = {"ssl": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
                "conv_dim": [4] * 7, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2},
        "emb_size": 8, "num_encoders": 1, "heads": 2, "kernel_size": 3, "ff_mult": 1}
torch.manual_seed(0)
detector = Detector(config_from_dict(arch, ModelConfig)).eval()
inputs = []
detector.register_forward_pre_hook(lambda module, args: inputs.append(int(args[0].shape[1])))
cfg = load_config(None, Stage1Config, [f"data.max_eval_seconds={sys.argv[2]}"])

def rss_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

rss_before, peak_before = rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scores = score_utterances(detector, [Utterance("long", sys.argv[1], 1)], cfg, progress=False)
peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"score": scores["long"], "inputs": inputs, "rss_before_kb": rss_before,
                  "peak_before_kb": peak_before, "peak_after_kb": peak_after}))
'''


def test_a_ten_minute_file_is_scored_in_chunks_in_bounded_memory(tmp_path):
    sr, seconds, chunk_s = 16000, 600, 30
    rng = np.random.default_rng(0)
    t = np.arange(seconds * sr) / sr
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    path = tmp_path / "ten_minutes.wav"
    sf.write(str(path), wave, sr, subtype="PCM_16")
    del t, wave
    out = subprocess.run([sys.executable, "-c", _LONG_SCORING, str(path), str(chunk_s)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.isfinite(m["score"])
    assert m["inputs"] == [chunk_s * sr] * (seconds // chunk_s)  # never one 10-minute forward pass
    growth_gb = (m["peak_after_kb"] - m["rss_before_kb"]) / 2**20
    assert growth_gb < 4.0, f"scoring a 10-minute file raised the peak RSS by {growth_gb:.2f} GB"
    print(f"10-minute file: peak RSS {m['rss_before_kb'] / 2**10:.0f} MB -> {m['peak_after_kb'] / 2**10:.0f} MB "
          f"(+{growth_gb * 1024:.0f} MB), {len(m['inputs'])} chunks of {chunk_s} s")


def test_train_cli_user_error_exits_2_with_one_line(tmp_path, capsys):
    """A config the user got wrong: exit status 2 and one line naming the file, no traceback."""
    from xai_lib import train

    missing = tmp_path / "nope.yaml"
    rc = train.main(["stage1", "--config", str(missing), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "stage1_detector.pth").exists()

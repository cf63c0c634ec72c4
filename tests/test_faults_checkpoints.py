"""Fault injection, checkpoints: untrusted files never run code, interrupted saves lose nothing,
and a Stage-2 module or state that does not fit the detector is refused before any work.

Already covered elsewhere (not repeated here): a published-format detector carrying a payload
(tests/test_checkpoint.py::test_refuses_a_checkpoint_that_would_execute_code), a failed
``save_detector`` (test_checkpoint.py::test_failed_save_keeps_the_previous_file), pickled segment
labels (test_data_protocols.py::test_restricted_unpickler_refuses_code_and_runs_nothing), an XAI
module against an SSL dim of 48 instead of 32
(test_stage2_training.py::test_loader_rejects_a_detector_of_another_dimension).
"""
from __future__ import annotations

import ast
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import tiny_model_dict

from xai_lib.explanation.methods import Attributor
from xai_lib.config import ModelConfig, Stage1Config, Stage2Config, XAIConfig, config_from_dict, load_config
from xai_lib.detector.checkpoint import (
    CheckpointError,
    hf_to_fairseq_key,
    load_detector,
    safe_torch_load,
    save_detector,
)
from xai_lib.detector.model import Detector
from xai_lib.importance.checkpoint import load_xai, save_xai
from xai_lib.importance.module import XAIModule
from xai_lib.training import BestCheckpoints, ResumeError, load_training_state, save_training_state

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


class _Payload:
    """Unpickling this with ``weights_only=False`` creates ``marker`` (arbitrary code would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _detector(emb_size: int = 16, ssl_hidden: int = 32, seed: int = 0) -> Detector:
    arch = tiny_model_dict()
    arch["emb_size"] = emb_size
    arch["ssl"]["hidden_size"] = ssl_hidden
    torch.manual_seed(seed)
    return Detector(config_from_dict(arch, ModelConfig)).eval()


def _xai(in_dim: int, representation: str = "ssl", seed: int = 0) -> tuple[XAIModule, XAIConfig]:
    cfg = XAIConfig(representation=representation, prototype_mode="fixed", importance_hidden_dim=8)
    torch.manual_seed(seed)
    module = XAIModule(in_dim, cfg)
    module.prototypes.set_from_class_means(torch.randn(2, in_dim))
    return module, cfg


def _poison(path: Path, marker: Path, where: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Re-save the checkpoint at ``path`` with a code-executing object planted in it."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    where(obj)["planted"] = _Payload(marker)
    torch.save(obj, path)


def _assert_refused(exc: BaseException, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the payload ran"
    assert isinstance(exc, CheckpointError), f"{type(exc).__name__}: {exc}"
    assert str(path) in str(exc) and "NOT executed" in str(exc)
    assert "weights_only=False" not in str(exc)  # never advise the unsafe load


def test_the_payload_is_live_when_loaded_unsafely(tmp_path):
    """Guards the tests below: the planted object really runs code under a full unpickler."""
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------- untrusted checkpoints


def _own_detector(path: Path, marker: Path) -> Callable[[], Any]:
    save_detector(_detector(), path, extra={"epoch": 3})
    _poison(path, marker, lambda o: o["extra"])
    return lambda: load_detector(path)


def _stage2(path: Path, marker: Path) -> Callable[[], Any]:
    module, cfg = _xai(32)
    save_xai(module, path, cfg, "stage1_detector.pth", "0" * 64)
    _poison(path, marker, lambda o: o["extra"])
    return lambda: load_xai(path)


def _plain(path: Path, marker: Path) -> Callable[[], Any]:
    torch.save({"weight": torch.zeros(2), "planted": _Payload(marker)}, path)
    return lambda: safe_torch_load(path)


@pytest.mark.parametrize("make", [_own_detector, _stage2, _plain], ids=["load_detector", "load_xai", "safe_torch_load"])
def test_checkpoint_loaders_refuse_code_naming_the_file(tmp_path, make):
    path, marker = tmp_path / "model.pth", tmp_path / "payload_ran"
    load = make(path, marker)
    with pytest.raises(CheckpointError) as err:
        load()
    _assert_refused(err.value, path, marker)


def _training_state(path: Path, marker: Path) -> Callable[[], Any]:
    save_training_state(path, {"epoch": 1, "model": {"w": torch.zeros(2)}})
    _poison(path, marker, lambda o: o)
    return lambda: load_training_state(path)


def _n_best(path: Path, marker: Path) -> Callable[[], Any]:
    best = BestCheckpoints(path.parent, keep=2)
    best.consider(0.5, 1, {"w": torch.zeros(2)})
    _poison(path.parent / "epoch_001.pth", marker, lambda o: o)
    return lambda: BestCheckpoints(path.parent, keep=2).state_dicts()


_RESUME_LOADERS = pytest.mark.parametrize(
    "make", [_training_state, _n_best], ids=["checkpoints/stage*/last.pth", "N-best epoch_NNN.pth"])


@_RESUME_LOADERS
def test_training_state_loaders_never_run_code(tmp_path, make):
    path, marker = tmp_path / "last.pth", tmp_path / "payload_ran"
    load = make(path, marker)
    with pytest.raises(Exception):  # noqa: B017 - the kind of error is the next test's subject
        load()
    assert not marker.exists()


@_RESUME_LOADERS
def test_training_state_loaders_refuse_code_with_a_clear_error(tmp_path, make):
    path, marker = tmp_path / "last.pth", tmp_path / "payload_ran"
    load = make(path, marker)
    with pytest.raises(CheckpointError) as err:
        load()
    planted = path if make is _training_state else path.parent / "epoch_001.pth"
    _assert_refused(err.value, planted, marker)


def _corpus_cfg(corpus: Path, schema: type, *overrides: str) -> Any:
    base: dict[str, Any] = {
        "data": {"root": str(corpus), "crop_samples": 8000, "max_train_utts": 8, "max_eval_utts": 4},
        "training": {"batch_size": 4, "eval_batch_size": 4, "num_epochs": 1, "max_steps_per_epoch": 1},
    }
    if schema is Stage1Config:
        base["model"] = tiny_model_dict()
    else:
        base["xai"] = {"importance_hidden_dim": 8}
    return load_config(base, schema, list(overrides))


def test_poisoned_resume_states_stop_both_trainings_before_any_work(tmp_path, tiny_corpus):
    """A planted last.pth never runs, and neither stage trains or writes its product."""
    from xai_lib.detector.training import train_stage1
    from xai_lib.importance.training import train_stage2

    marker = tmp_path / "payload_ran"
    for stage, train, schema in ((1, train_stage1, Stage1Config), (2, train_stage2, Stage2Config)):
        run_dir = tmp_path / f"run{stage}"
        if stage == 2:
            save_detector(_detector(), run_dir / "stage1_detector.pth")
        state = run_dir / "checkpoints" / f"stage{stage}" / "last.pth"
        save_training_state(state, {"epoch": 1})
        _poison(state, marker, lambda o: o)
        with pytest.raises(Exception):
            train(_corpus_cfg(tiny_corpus, schema), run_dir, progress=False)
        assert not marker.exists()
        assert not (run_dir / ("stage1_detector.pth" if stage == 1 else "stage2_xai.pth")).exists()
        assert not list((run_dir / "checkpoints" / f"stage{stage}").glob("epoch_*.pth"))


def test_stage2_refuses_a_poisoned_detector_before_creating_anything(tmp_path, tiny_corpus):
    from xai_lib.importance.training import train_stage2

    detector, marker = tmp_path / "detector.pth", tmp_path / "payload_ran"
    _own_detector(detector, marker)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        train_stage2(_corpus_cfg(tiny_corpus, Stage2Config), run_dir, detector_path=detector, progress=False)
    _assert_refused(err.value, detector, marker)
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- source scan

_SCANNED = sorted(ROOT.glob("xai_lib/**/*.py")) + sorted(ROOT.glob("notebooks/*.ipynb"))


def _sources() -> list[tuple[str, str]]:
    out = []
    for path in _SCANNED:
        if path.suffix == ".ipynb":
            cells = json.loads(path.read_text())["cells"]
            code = "\n".join(
                "".join(c["source"]) for c in cells if c["cell_type"] == "code"
            )
            code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
            out.append((str(path.relative_to(ROOT)), code))
        else:
            out.append((str(path.relative_to(ROOT)), path.read_text()))
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _is_const(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _scan(name: str, code: str) -> tuple[list[str], int]:
    """Unsafe loading calls in ``code`` and the number of ``torch.load`` calls seen."""
    tree = ast.parse(code, filename=name)
    aliases: dict[str, str] = {}
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    n_torch_loads = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_dotted(b) == "pickle.Unpickler" for b in node.bases):
            if (name, node.name) != ("xai_lib/data/protocols.py", "_NumpyOnlyUnpickler"):  # the NumPy-only one
                problems.append(f"{name}:{node.lineno}: unpickler subclass {node.name}")
        if not isinstance(node, ast.Call):
            continue
        head, *rest = _dotted(node.func).split(".")
        func = ".".join([aliases.get(head, head), *rest])  # np.load -> numpy.load, torch.load stays
        where = f"{name}:{node.lineno}: {func}"
        kwargs = {k.arg: k.value for k in node.keywords}
        if func == "torch.load":
            n_torch_loads += 1
            if not _is_const(kwargs.get("weights_only"), True):
                problems.append(f"{where} without weights_only=True")
        elif func == "numpy.load":
            if "allow_pickle" in kwargs and not _is_const(kwargs["allow_pickle"], False):
                problems.append(f"{where} with allow_pickle")
        elif func in _FORBIDDEN or func in ("eval", "exec"):
            problems.append(f"{where}(...) can run code from data")
    return problems, n_torch_loads


_FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads", "dill.load", "dill.loads",
    "joblib.load", "shelve.open", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load",
    "torch.serialization.add_safe_globals", "torch.serialization.safe_globals",
}


def test_the_source_scan_finds_unsafe_loading():
    bad = (
        "import torch, pickle\nimport numpy as np\nfrom pickle import loads as pl\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\nnp.load('b', allow_pickle=True)\n"
        "pickle.load(f)\npl(b)\neval('1')\nclass U(pickle.Unpickler): pass\n"
        "torch.load('ok', weights_only=True)\nnp.load('ok')\nmodel.eval()\n"
    )
    problems, n = _scan("bad.py", bad)
    assert n == 3 and len(problems) == 7, problems


def test_source_never_loads_files_with_a_full_unpickler():
    """Every torch.load passes weights_only=True, np.load never allows pickles, no pickle/yaml.load."""
    problems: list[str] = []
    loading: list[str] = []
    for name, code in _sources():
        found, n = _scan(name, code)
        problems += found
        loading += [name] * (n > 0)
    assert "xai_lib/files.py" in loading  # the scan sees safe_torch_load's torch.load
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- interrupted writes


def _writer_cases(tmp_path: Path) -> dict[str, tuple[Callable[[int], Path], Callable[[Path], Any]]]:
    """name -> (write version v -> path, load path -> a value that identifies the version)."""
    best_dir = tmp_path / "best"

    def detector(v: int) -> Path:
        return save_detector(_detector(seed=v), tmp_path / "stage1_detector.pth", extra={"version": v})

    def xai(v: int) -> Path:
        module, cfg = _xai(32, seed=v)
        return save_xai(module, tmp_path / "stage2_xai.pth", cfg, "stage1_detector.pth", "0" * 64, extra={"version": v})

    def state(v: int) -> Path:
        return save_training_state(tmp_path / "last.pth", {"epoch": v, "model": {"w": torch.full((4,), float(v))}})

    def best(v: int) -> Path:
        keeper = BestCheckpoints(best_dir, keep=1)
        keeper.consider(1.0 / v, v, {"w": torch.full((4,), float(v))})  # each version is the new best
        return best_dir / keeper.entries[0]["file"]

    return {
        "save_detector": (detector, lambda p: load_detector(p).load_report.extra["version"]),
        "save_xai": (xai, lambda p: load_xai(p).extra["version"]),
        "save_training_state": (state, lambda p: load_training_state(p)["epoch"]),
        "BestCheckpoints.consider": (best, lambda p: int(BestCheckpoints(p.parent, keep=1).state_dicts()[0]["w"][0])),
    }


def _half_then(action: Callable[[], None]) -> Callable[..., None]:
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])  # half of the new checkpoint reaches the disk
        f.flush()
        action()

    return save


@pytest.mark.parametrize("writer", ["save_detector", "save_xai", "save_training_state", "BestCheckpoints.consider"])
def test_a_save_that_dies_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    write, read = _writer_cases(tmp_path)[writer]
    path = write(1)
    before = path.read_bytes()

    # 1. the write raises halfway (disk full): previous file intact, no temporary left behind
    def disk_full() -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", _half_then(disk_full))
    with pytest.raises(OSError, match="No space left"):
        write(2)
    monkeypatch.undo()
    assert path.read_bytes() == before and read(path) == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    # 2. the process is SIGKILLed halfway (no cleanup code runs at all)
    pid = os.fork()
    if pid == 0:  # child: die in the middle of the write
        try:
            torch.save = _half_then(lambda: os.kill(os.getpid(), signal.SIGKILL))
            write(2)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_bytes() == before and read(path) == 1  # the previous checkpoint is untouched
    leftovers = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # a hidden temporary, never the target

    # 3. the next save works and wins; the killed writer's temporary is swept once it is a minute old
    old = time.time() - 120
    for p in leftovers:
        os.utime(p, (old, old))
    assert read(write(2)) == 2
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- dimension mismatch


def test_xai_of_another_detector_is_refused_before_explaining(tmp_path):
    """An XAI module read from back-end tokens of an emb-16 detector, applied to an emb-32 one."""
    trained_on, other = _detector(emb_size=16), _detector(emb_size=32)
    module, cfg = _xai(16, representation="backend")
    path = save_xai(module, tmp_path / "stage2_xai.pth", cfg, "runs/a/stage1_detector.pth", "0" * 64)

    with pytest.raises(CheckpointError) as err:
        load_xai(path, detector=other)
    msg = str(err.value)
    assert "'backend'" in msg and "16" in msg and "32" in msg and "runs/a/stage1_detector.pth" in msg

    xai = load_xai(path)  # loaded without a detector: the mismatch surfaces at the first use
    wave, lengths = 0.1 * torch.randn(1, 4000), torch.tensor([4000])
    for call in (lambda: xai.frame_importance(other, wave, lengths),
                 lambda: Attributor(other, importance_model=xai).attribute(wave, lengths, method="importance")):
        with pytest.raises(CheckpointError, match="retrain Stage 2 on this detector"):
            call()
    assert xai.frame_importance(trained_on, wave, lengths).shape == (1, 12)  # the right detector works


def _published(model: Detector) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("ssl_model."):
            out["ssl_model.model." + hf_to_fairseq_key(key[len("ssl_model."):], "layer")] = tensor
        else:
            out[key] = tensor
    return out


def test_stage2_detector_config_that_disagrees_with_the_file_fails_before_any_work(tmp_path, tiny_corpus):
    """detector.config says emb_size 32 for a published state dict holding emb_size 16."""
    from xai_lib.importance.training import train_stage2

    detector = tmp_path / "avg_5_best.pth"
    torch.save(_published(_detector(emb_size=16)), detector)
    arch = tmp_path / "arch.yaml"
    arch.write_text(json.dumps({"model": {**tiny_model_dict(), "emb_size": 32}}))
    run_dir = tmp_path / "run"
    cfg = _corpus_cfg(tiny_corpus, Stage2Config, f"detector.path={detector}", f"detector.config={arch}")
    with pytest.raises(CheckpointError) as err:
        train_stage2(cfg, run_dir, progress=False)
    msg = str(err.value)
    assert str(detector) in msg and "LL.weight" in msg and "emb_size=16" in msg
    assert not run_dir.exists()  # nothing was created


def _foreign_stage2_state(tmp_path: Path, tiny_corpus: Path) -> tuple[Path, Stage2Config]:
    """A run directory whose Stage-2 resumable state came from a detector with 48-dim SSL frames."""
    run_dir = tmp_path / "run"
    save_detector(_detector(), run_dir / "stage1_detector.pth")
    cfg = _corpus_cfg(tiny_corpus, Stage2Config)
    module, _ = _xai(48)
    save_training_state(run_dir / "checkpoints" / "stage2" / "last.pth", {
        "xai": module.state_dict(), "epoch": 1, "in_dim": 48, "detector_sha256": "f" * 64,
        "xai_config": {k: getattr(cfg.xai, k) for k in vars(cfg.xai)},
    })
    (run_dir / "config_stage2.yaml").write_text("# the config of the run that wrote last.pth\n")
    return run_dir, cfg


def test_stage2_resume_state_of_another_detector_dimension_is_refused(tmp_path, tiny_corpus):
    from xai_lib.importance.training import train_stage2

    run_dir, cfg = _foreign_stage2_state(tmp_path, tiny_corpus)
    with pytest.raises(ResumeError) as err:
        train_stage2(cfg, run_dir, progress=False)
    msg = str(err.value)
    assert "another detector file" in msg and "dim is 48, this detector's is 32" in msg and "resume=False" in msg
    assert not (run_dir / "stage2_xai.pth").exists()


def test_a_refused_stage2_resume_leaves_the_run_config_untouched(tmp_path, tiny_corpus):
    from xai_lib.importance.training import train_stage2

    run_dir, cfg = _foreign_stage2_state(tmp_path, tiny_corpus)
    before = (run_dir / "config_stage2.yaml").read_bytes()
    with pytest.raises(ResumeError):
        train_stage2(cfg, run_dir, progress=False)
    assert (run_dir / "config_stage2.yaml").read_bytes() == before


def test_a_live_writers_temporary_is_never_swept(tmp_path):
    from xai_lib.detector.checkpoint import atomic_torch_save

    live = tmp_path / f".model.pth.{os.getpid()}.abc.tmp"  # this process is alive
    live.write_bytes(b"partial")
    foreign = tmp_path / ".model.pth.notapid.tmp"
    foreign.write_bytes(b"?")
    old = time.time() - 3600
    for p in (live, foreign):
        os.utime(p, (old, old))
    atomic_torch_save({"x": torch.ones(1)}, tmp_path / "model.pth")
    assert live.exists() and foreign.exists()

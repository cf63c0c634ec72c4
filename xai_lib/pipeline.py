"""The batch pipeline: notebooks 01 → 02 → 03 executed by papermill into one run directory.

``python -m xai_lib.pipeline`` (console script ``xai-pipeline``) runs the three stages in
order, each as a papermill execution of its notebook, and saves the executed notebooks
(outputs, figures, tracebacks) into the run directory. It passes only what it must (config
files, run directory, data root, overrides, smoke, resume): every hyper-parameter comes
from the configs, exactly as when the notebooks are run by hand.

Examples::

    python -m xai_lib.pipeline                                  # all stages, outputs/<time>-run
    python -m xai_lib.pipeline --stage1 --run-dir outputs/r1    # detector only
    python -m xai_lib.pipeline --stage2 --stage3 --run-dir outputs/r1   # add Stage 2/3 to it
    python -m xai_lib.pipeline --smoke -p seed 7 --override training.lr=1e-4
    python -m xai_lib.pipeline --sweep prototype_mode=ema,fixed,learnable --run-dir outputs/sw
    python -m xai_lib.pipeline --demo                           # what `make demo` runs

Run-directory rules (see also :mod:`xai_lib.runs`):

1. A run directory held by another *live* process (``run_dir/.lock``) is refused.
2. A stage whose product already exists in the run directory is refused without
   ``--overwrite``. A stage's product exists when ``run.json`` records the stage as
   ``ok``, or — for a stage ``run.json`` does not record as run — when its checkpoint
   (``stage1_detector.pth``, ``stage2_xai.pth``) or its ``metrics.json`` key
   (``stage1``/``stage2``/``stage3``) is there. A stage recorded as ``failed`` (or left
   ``running`` by a crash) may be re-run without ``--overwrite``.
   So a finished run is never overwritten silently, while ``--stage2``/``--stage3`` may
   be added to a directory that an earlier ``--stage1`` run produced.
3. ``--overwrite`` re-runs the selected stages in place: their ``metrics.json`` keys are
   removed first, their products are replaced by the notebooks, the earlier ``run.json``
   is kept under ``history``.

Paths: relative paths on the command line and the default ``outputs/`` are taken relative
to ``--cwd`` (default: the current directory), which is also the notebook kernels' working
directory, so a relative path means the same to the runner and to the notebooks; the
runner passes absolute paths. Default configs not found there come from the checkout.

Exit codes: 0 all selected stages ran, 1 a stage failed (``STAGE N FAILED`` on stderr with
the executed notebook and the failing cell), 2 a usage error caught before any stage ran,
130 interrupted.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.metadata
import logging
import math
import os
import platform
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from xai_lib.console import say, say_error

import yaml

from xai_lib.paths import PROJECT_ROOT
from xai_lib.runs import RunDirectory, RunDirectoryError, default_run_dir

__all__ = [
    "Stage",
    "STAGES",
    "COMPARISON_METRICS",
    "PipelineError",
    "build_parser",
    "main",
    "default_notebooks_dir",
    "resolve_kernel",
    "parse_param_value",
    "write_sweep_comparison",
    "format_metrics_summary",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its notebook, its ``metrics.json`` key and its products."""

    number: int
    notebook: str  # file name inside the notebooks directory
    key: str  # metrics.json / run.json key
    title: str
    products: tuple[str, ...] = ()  # files under run_dir that mark the stage as done

    @property
    def label(self) -> str:
        return f"Stage {self.number} ({self.title})"


STAGES: tuple[Stage, ...] = (
    Stage(1, "01_detector_training.ipynb", "stage1", "detector training", ("stage1_detector.pth",)),
    Stage(2, "02_xai_training.ipynb", "stage2", "XAI module training", ("stage2_xai.pth",)),
    Stage(3, "03_attribution_visualization.ipynb", "stage3", "attribution and visualization"),
)
_BY_NUMBER = {s.number: s for s in STAGES}

#: Stage-3 metrics compared across sweep values (``metrics.json["stage3"]["methods"][m]``).
COMPARISON_METRICS: tuple[str, ...] = (
    "deletion_auc",
    "insertion_auc",
    "loc_auc",
    "loc_eer",
    "pointing_game",
    "ms_per_utt",
)
_METRIC_HINT = {
    "deletion_auc": "lower is better",
    "insertion_auc": "higher is better",
    "loc_auc": "higher is better",
    "loc_eer": "lower is better",
    "pointing_game": "higher is better",
    "ms_per_utt": "lower is cheaper",
}

#: Notebook parameters holding paths: made absolute (relative to the current directory).
_PATH_PARAMS = frozenset({"config_path", "data_root", "run_dir", "stage1_checkpoint", "stage2_checkpoint"})
#: Parameters the runner owns; ``-p`` may not set them.
_RESERVED_PARAMS = {"run_dir": "--run-dir", "config_path": "--config-stage1 / --config-stage2"}

_DEFAULT_CONFIG_STAGE1 = "configs/demo.yaml"
_DEFAULT_CONFIG_STAGE2 = "configs/xai_stage2.yaml"
_DEMO_CONFIG_STAGE2 = "configs/demo_stage2.yaml"
_DEMO_RUN_DIR = "outputs/demo"
_DEMO_CORPUS = "outputs/data/demo_corpus"
_OWN_KERNEL = "xai-lib"

EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class PipelineError(RuntimeError):
    """A usage error found before (or between) stages: bad flag, parameter, path or run directory."""


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m xai_lib.pipeline``."""
    p = argparse.ArgumentParser(
        prog="python -m xai_lib.pipeline",
        description="Run notebooks 01 (detector) -> 02 (XAI module) -> 03 (attribution) with papermill "
        "into one run directory. Without --stage1/--stage2/--stage3 all stages run.",
        epilog="Run directories: one held by another live process is refused; a stage whose product "
        "already exists there (run.json says 'ok', or its checkpoint / metrics.json key is present) is "
        "refused without --overwrite; failed stages may be re-run; --stage2/--stage3 may be added to a "
        "directory produced by an earlier --stage1 run.",
    )
    g = p.add_argument_group("stages")
    g.add_argument("--stage1", action="store_true", help="run Stage 1 (notebook 01: detector training)")
    g.add_argument("--stage2", action="store_true", help="run Stage 2 (notebook 02: XAI module on the frozen detector)")
    g.add_argument("--stage3", action="store_true", help="run Stage 3 (notebook 03: attribution, metrics, figures)")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", help="run directory (default: outputs/<YYYYmmdd-HHMMSS>-run; outputs/demo with --demo)")
    g.add_argument("--overwrite", action="store_true", help="re-run stages whose products already exist in --run-dir")
    g.add_argument("--demo", action="store_true",
                   help="the embedded demo: generate the synthetic corpus if absent, run everything into outputs/demo")
    g.add_argument("--smoke", action="store_true", help="smoke=True for every notebook (a seconds-long run)")
    g.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="run Stage 2+3 once per value of a Stage-2 key (notebook-02 parameter or xai.KEY) against one "
                   "Stage-1 detector, into run_dir/sweep/KEY=VALUE/, then write sweep/comparison.md and .png")
    g = p.add_argument_group("parameters")
    g.add_argument("--config-stage1", help=f"Stage-1 YAML, config_path of notebook 01 (default {_DEFAULT_CONFIG_STAGE1})")
    g.add_argument("--config-stage2", help=f"Stage-2 YAML, config_path of notebook 02 (default {_DEFAULT_CONFIG_STAGE2})")
    g.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="notebook parameter (VALUE is a YAML literal: 7, 1e-4, true, '[ig, saliency]'); passed to "
                   "every notebook that declares NAME; repeatable")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override appended to `overrides` of the notebooks whose config has the "
                   "section: model.* 01, xai.*/detector.* 02, training.* 01 and 02, data.* all three "
                   "(e.g. training.lr=1e-4, data.eval_audio_dir=wavs/eval); repeatable")
    g.add_argument("--data-root", help="database root passed as data_root (default: data.root of the configs)")
    g = p.add_argument_group("execution")
    g.add_argument("--notebooks-dir", help="folder holding the three notebooks (default: the repository's notebooks/)")
    g.add_argument("--kernel", default="python3",
                   help="Jupyter kernel (default python3 = this Python; a kernel for it is registered if needed)")
    g.add_argument("--cwd", help="working directory of the notebook kernels, and the directory relative paths on this "
                   "command line (and the default outputs/) are taken from (default: the current directory)")
    g.add_argument("--log-output", action="store_true", help="stream the notebooks' outputs into the log")
    g.add_argument("--no-progress", action="store_true", help="no papermill progress bars")
    return p


def default_notebooks_dir() -> Path:
    """The repository's ``notebooks/`` (next to the ``xai_lib`` package)."""
    import xai_lib

    return Path(xai_lib.__file__).resolve().parent.parent / "notebooks"


def parse_param_value(raw: str) -> Any:
    """A ``-p`` value as a YAML literal (``"7"`` → 7, ``"[a, b]"`` → list); ``""`` stays ``""``."""
    if raw.strip() == "":
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _NUMBER.fullmatch(raw.strip()):
        return float(raw)  # YAML 1.1 reads "1e-4" as a string
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce_param(name: str, value: Any, raw: str | None, declared: Mapping[str, Any], notebook: str) -> Any:
    """Check ``value`` against the type annotated in the notebook's parameters cell."""
    tp = str(declared.get("inferred_type_name") or "")
    optional = re.fullmatch(r"Optional\[(\w+)\]", tp)
    if optional:
        if value is None:
            return None  # None: the config's value
        declared = {**declared, "inferred_type_name": optional.group(1)}
        tp = optional.group(1)
    helptext = f" ({declared['help']})" if declared.get("help") else ""

    def bad(kind: str) -> PipelineError:
        return PipelineError(
            f"parameter {name}={value!r}: {notebook} declares `{name}: {tp}`{helptext}; give {kind} "
            f"(values are YAML literals, e.g. -p {name} {_example(tp)})"
        )

    if tp == "str":
        if isinstance(value, str):
            return value
        if raw is not None:
            return raw
        if isinstance(value, (int, float, bool)):
            return str(value)
        raise bad("a string")
    if tp == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp == "list":
        if not isinstance(value, list):
            raise bad("a list")
        return value
    if tp == "dict":
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    return value


def _example(tp: str) -> str:
    return {"str": "text", "float": "0.5", "int": "3", "bool": "true", "list": "'[a, b]'", "dict": "'{a: 1}'"}.get(tp, "VALUE")


# ============================================================================ environment


def resolve_kernel(name: str = "python3") -> str:
    """The kernel name to hand papermill, making sure ``python3`` runs *this* interpreter.

    ``python3`` is kept when its kernelspec starts ``python``/``python3`` (jupyter_client
    then substitutes ``sys.executable``) or ``sys.executable`` itself. Otherwise (no
    kernelspec, or one that points at another Python) a kernel named ``xai-lib`` is
    registered for this interpreter with ``ipykernel install --sys-prefix`` and used.

    Raises:
        PipelineError: ipykernel is missing, or a named non-default kernel does not exist.
    """
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError as exc:  # pragma: no cover - papermill depends on it
        raise PipelineError(f"jupyter_client is not installed ({exc}); pip install papermill ipykernel") from None
    ksm = KernelSpecManager()

    def spec_argv(kernel: str) -> list[str] | None:
        try:
            return list(ksm.get_kernel_spec(kernel).argv)
        except NoSuchKernel:
            return None

    if name != "python3":
        if spec_argv(name) is None:
            raise PipelineError(
                f"Jupyter kernel {name!r} not found (installed: {', '.join(sorted(ksm.find_kernel_specs())) or 'none'}); "
                "leave --kernel out to use this Python"
            )
        return name
    for candidate in ("python3", _OWN_KERNEL):
        argv = spec_argv(candidate)
        if argv and _runs_this_python(argv):
            return candidate
    try:
        import ipykernel  # noqa: F401
    except ImportError:
        raise PipelineError(
            f"ipykernel is not installed in {sys.executable}; the notebooks need a kernel for this Python: "
            f"{sys.executable} -m pip install ipykernel"
        ) from None
    log.info("registering a Jupyter kernel %r for %s (ipykernel install --sys-prefix)", _OWN_KERNEL, sys.executable)
    proc = subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", _OWN_KERNEL,
         "--display-name", f"Python (xai_lib, {sys.prefix})"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise PipelineError(
            f"could not register a Jupyter kernel for {sys.executable}: {proc.stderr.strip()[-500:]}; "
            f"run `{sys.executable} -m ipykernel install --user --name {_OWN_KERNEL}` and pass --kernel {_OWN_KERNEL}"
        )
    return _OWN_KERNEL


def _runs_this_python(argv: Sequence[str]) -> bool:
    exe = argv[0] if argv else ""
    if exe in {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}:
        return True  # jupyter_client replaces these with sys.executable
    return os.path.abspath(exe) == os.path.abspath(sys.executable)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("xai_lib", "torch", "torchaudio", "transformers", "captum", "papermill", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import xai_lib

    out["xai_lib"] = getattr(xai_lib, "__version__", out["xai_lib"])
    return out


def _git_info(root: Path) -> dict[str, Any] | None:
    """Commit and dirtiness of the checkout (None when not a git repository or no git)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _command_line(argv: Sequence[str]) -> str:
    prog = "xai-pipeline" if sys.argv and Path(sys.argv[0]).name == "xai-pipeline" else "python -m xai_lib.pipeline"
    return shlex.join([*prog.split(), *argv])


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# ============================================================================ runner


@dataclass
class _Plan:
    """Everything decided from the command line before any stage runs."""

    stages: list[Stage]
    run_dir: Path
    notebooks_dir: Path
    cwd: Path
    kernel: str
    declared: dict[int, dict[str, dict[str, Any]]]  # stage number -> notebook parameters
    params: dict[int, dict[str, Any]]  # stage number -> parameters to pass
    configs: dict[int, Path]  # stage number -> input config file
    data_root: str | None  # absolute, or None = from the configs
    sweep: tuple[str, list[tuple[str, Any]], str] | None  # key, [(raw, value)], "parameter"|"override"
    overwrite: bool
    progress: bool
    log_output: bool
    demo: bool


class _Pipeline:
    def __init__(self, plan: _Plan, argv: Sequence[str]) -> None:
        self.plan = plan
        self.argv = list(argv)
        self.failed: list[str] = []  # "Stage 2" or "prototype_mode=fixed: Stage 2"

    # ------------------------------------------------------------------ records
    def _new_record(self, run: RunDirectory, previous: dict[str, Any] | None, stages: Sequence[Stage],
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        history = list((previous or {}).pop("history", []) or [])
        if previous:
            history.append(previous)
        record: dict[str, Any] = {
            "status": RunDirectory.RUNNING,
            "command": _command_line(self.argv),
            "argv": self.argv,
            "cwd": str(self.plan.cwd),
            "run_dir": str(run.path),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "versions": _versions(),
            "git": _git_info(PROJECT_ROOT),
            "kernel": self.plan.kernel,
            "notebooks_dir": str(self.plan.notebooks_dir),
            "started": _now(),
            "ended": None,
            "duration_s": None,
            "stages_requested": [s.number for s in stages],
            "stages": {},
        }
        prev_stages = (previous or {}).get("stages", {}) or {}
        for st in STAGES:
            if st in stages:
                record["stages"][st.key] = {"status": "not run"}
            elif prev_stages.get(st.key, {}).get("status") not in (None, "skipped", "not run"):
                earlier = dict(prev_stages[st.key])
                earlier.setdefault("from_earlier_run", (previous or {}).get("started"))
                record["stages"][st.key] = earlier
            else:
                record["stages"][st.key] = {"status": "skipped"}
        if extra:
            record.update(extra)
        if history:
            record["history"] = history
        return record

    @staticmethod
    def _finish_record(run: RunDirectory, record: dict[str, Any], status: str, t0: float) -> None:
        record["status"] = status
        record["ended"] = _now()
        record["duration_s"] = round(time.monotonic() - t0, 3)
        run.write_record(record)

    # ------------------------------------------------------------------ rules
    @staticmethod
    def done_stages(run: RunDirectory, previous: Mapping[str, Any] | None) -> dict[str, str]:
        """Stage key -> why it counts as done in ``run`` (rule 2 of the module docstring)."""
        metrics = run.read_metrics()
        out: dict[str, str] = {}
        for st in STAGES:
            status = ((previous or {}).get("stages", {}) or {}).get(st.key, {}).get("status")
            if status == "ok":
                out[st.key] = f"{RunDirectory.RECORD_NAME} records {st.label} as ok"
            elif status in ("failed", "running"):
                continue
            else:
                found = [p for p in st.products if (run.path / p).exists()]
                if st.key in metrics:
                    found.append(f"metrics.json key '{st.key}'")
                if found:
                    out[st.key] = f"{st.label} products exist: {', '.join(found)}"
        return out

    def _check_overwrite(self, run: RunDirectory, previous: Mapping[str, Any] | None, stages: Sequence[Stage],
                         apply: bool = True) -> None:
        """Raise unless the selected ``stages`` may run into ``run`` (rule 2); with --overwrite
        and ``apply``, remove the metrics.json keys of the stages about to be re-run."""
        done = self.done_stages(run, previous)
        clash = [st for st in stages if st.key in done]
        if not clash:
            return
        if not self.plan.overwrite:
            why = "; ".join(done[st.key] for st in clash)
            which = " ".join(f"--stage{st.number}" for st in clash)
            todo = [st for st in stages if st.key not in done]
            rest = (f", or run only the stages it lacks ({' '.join(f'--stage{st.number}' for st in todo)})"
                    if todo else "")
            raise PipelineError(
                f"{run.path} already holds finished results ({why}). Nothing was changed. Pick another --run-dir{rest}, "
                f"or pass --overwrite to re-run {which} into it (the products of those stages are replaced)."
            )
        if not apply:
            return
        dropped = run.drop_metrics([st.key for st in clash])
        log.warning("--overwrite: re-running %s in %s%s", ", ".join(st.label for st in clash), run.path,
                    f" (removed metrics.json keys {dropped})" if dropped else "")
        later = [s for s in STAGES if s.number > min(st.number for st in clash) and s not in stages and s.key in done]
        if later:
            log.warning("the existing results of %s were computed from the previous %s and are now stale",
                        ", ".join(s.label for s in later), clash[0].label)

    # ------------------------------------------------------------------ execution
    def _copy_configs(self, run: RunDirectory, stages: Sequence[Stage]) -> None:
        for st in stages:
            src = self.plan.configs.get(st.number)
            if src is None:
                continue
            dst = run.path / "configs" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.resolve() != dst.resolve():
                shutil.copy2(src, dst)

    def _run_stage(self, run: RunDirectory, record: dict[str, Any], st: Stage, params: dict[str, Any]) -> bool:
        """Execute one notebook; True on success. Updates ``run.json`` before and after."""
        import papermill as pm
        from papermill.exceptions import PapermillExecutionError

        nb_in = self.plan.notebooks_dir / st.notebook
        nb_out = run.path / "notebooks" / st.notebook
        nb_out.parent.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {
            "status": "running",
            "notebook": str(nb_out),
            "input_notebook": str(nb_in),
            "parameters": params,
            "started": _now(),
        }
        record["stages"][st.key] = entry
        run.write_record(record)
        say(f"==> STAGE {st.number}: {st.title}  [{nb_in.name} -> {nb_out}]")
        log.info("%s parameters: %s", st.label, params)
        t0 = time.monotonic()
        ok = False
        try:
            pm.execute_notebook(
                str(nb_in), str(nb_out), parameters=params, kernel_name=self.plan.kernel,
                progress_bar=self.plan.progress, log_output=self.plan.log_output, cwd=str(self.plan.cwd),
            )
            ok = True
        except PapermillExecutionError as exc:
            entry["error"] = {"ename": exc.ename, "evalue": exc.evalue, "cell_execution_count": exc.exec_count,
                              "cell_source": exc.source}
            self._report_failure(st, nb_out, exc.ename, exc.evalue, exc.source, exc.exec_count, time.monotonic() - t0,
                                 _failing_line(exc.traceback, exc.exec_count))
        except KeyboardInterrupt:
            entry["error"] = {"ename": "KeyboardInterrupt", "evalue": "interrupted"}
            raise
        except Exception as exc:  # kernel died, notebook unreadable, ...
            entry["error"] = {"ename": type(exc).__name__, "evalue": str(exc)}
            self._report_failure(st, nb_out, type(exc).__name__, str(exc), None, None, time.monotonic() - t0)
        finally:
            entry["status"] = "ok" if ok else "failed"
            entry["ended"] = _now()
            entry["duration_s"] = round(time.monotonic() - t0, 3)
            run.write_record(record)
        if ok:
            say(f"    stage {st.number} ok ({entry['duration_s']:.1f} s)")
        return ok

    @staticmethod
    def _report_failure(st: Stage, nb_out: Path, ename: str, evalue: str, source: str | None,
                        exec_count: int | None, seconds: float, line: int | None = None) -> None:
        lines = [f"STAGE {st.number} FAILED: {st.title} (after {seconds:.1f} s)"]
        if nb_out.exists():
            lines.append(f"  executed notebook with the full traceback: {nb_out}")
        if source is not None:
            cell = f"In [{exec_count}]" if exec_count is not None else "a cell"
            src = source.splitlines()
            if line is not None and 1 <= line <= len(src):  # the lines around the one that raised
                lo, hi = max(1, line - 3), min(len(src), line + 1)
            else:
                while src and not src[0].strip():
                    src.pop(0)
                lo, hi = 1, min(len(src), 8)
            where = f", line {line}" if line is not None else ""
            lines.append(f"  failing cell {cell}{where}:")
            if lo > 1:
                lines.append("    | ...")
            lines += [f"  {'->' if i == line else '  '}| {src[i - 1]}" for i in range(lo, hi + 1)]
            if hi < len(src):
                lines.append(f"    | ... ({len(src) - hi} more lines)")
        first = (evalue or "").strip().splitlines()
        lines.append(f"  {ename}: {first[0] if first else ''}" + (" ..." if len(first) > 1 else ""))
        say_error("\n".join(lines))

    def _run_chain(self, run: RunDirectory, record: dict[str, Any], stages: Sequence[Stage],
                   params: Mapping[int, dict[str, Any]], prefix: str = "") -> bool:
        for i, st in enumerate(stages):
            if not self._run_stage(run, record, st, params[st.number]):
                self.failed.append(f"{prefix}{st.label}")
                rest = stages[i + 1:]
                if rest:
                    say_error(f"  not run: {', '.join(s.label for s in rest)} (the chain stops at the failed stage)")
                return False
        return True

    # ------------------------------------------------------------------ main paths
    def run(self) -> int:
        plan = self.plan
        run = RunDirectory(plan.run_dir, command=_command_line(self.argv))
        try:
            run.acquire()
        except RunDirectoryError as exc:
            raise PipelineError(str(exc)) from None
        t0 = time.monotonic()
        record: dict[str, Any] | None = None
        try:
            previous = run.read_record()
            chain = [st for st in plan.stages if not (plan.sweep and st.number > 1)]
            if plan.sweep:
                chain = self._sweep_stage1(run, chain)
                self._check_overwrite(run, previous, chain)
                for raw, _ in plan.sweep[1]:
                    sub = RunDirectory(self._sweep_dir(run, plan.sweep[0], raw))
                    self._check_overwrite(sub, sub.read_record(), [s for s in plan.stages if s.number > 1], apply=False)
            else:
                self._check_overwrite(run, previous, chain)
            extra = {"sweep": {"key": plan.sweep[0], "values": [r for r, _ in plan.sweep[1]], "passed_as": plan.sweep[2],
                               "runs": {}}} if plan.sweep else None
            record = self._new_record(run, previous, chain, extra)
            if plan.sweep and _BY_NUMBER[1] in plan.stages and _BY_NUMBER[1] not in chain:
                entry = record["stages"]["stage1"]
                entry["reason"] = "the sweep reuses the existing Stage-1 detector"
                if entry.get("status") != "ok":
                    entry["status"] = "skipped"
            run.write_record(record)
            self._copy_configs(run, chain)
            say(f"Run directory: {run.path}")
            ok = self._run_chain(run, record, chain, plan.params)
            if ok and plan.sweep:
                ok = self._run_sweep(run, record)
            self._finish_record(run, record, "finished" if ok else "failed", t0)
        except PipelineError:
            if record is not None:  # e.g. a sweep sub-directory turned out to be busy
                self._finish_record(run, record, "failed", t0)
            raise
        except KeyboardInterrupt:
            if record is not None:
                for entry in record["stages"].values():
                    if entry.get("status") == "running":
                        entry["status"] = "failed"
                self._finish_record(run, record, "interrupted", t0)
            say_error(f"interrupted; {run.record_path} records where it stopped")
            return EXIT_INTERRUPTED
        finally:
            run.release()
        self._print_summary(run, record)
        if not ok:
            say_error(f"Pipeline FAILED ({'; '.join(self.failed)}); see {run.record_path}")
            return EXIT_STAGE_FAILED
        return EXIT_OK

    # ------------------------------------------------------------------ sweep
    @staticmethod
    def _sweep_dir(run: RunDirectory, key: str, raw: str) -> Path:
        return run.path / "sweep" / f"{key}={raw}"

    def _sweep_stage1(self, run: RunDirectory, chain: list[Stage]) -> list[Stage]:
        """Drop Stage 1 from the chain when a detector is given or already in the run directory."""
        given = self.plan.params.get(2, {}).get("stage1_checkpoint")
        existing = run.path / "stage1_detector.pth"
        if any(st.number == 1 for st in chain) and (given or existing.exists()):
            log.info("sweep: reusing the Stage-1 detector %s", given or existing)
            return [st for st in chain if st.number != 1]
        return chain

    def _detector_for_sweep(self, run: RunDirectory) -> str:
        given = self.plan.params.get(2, {}).get("stage1_checkpoint")
        if given:
            return str(given)
        existing = run.path / "stage1_detector.pth"
        if existing.exists():
            return str(existing)
        log.warning("sweep: no Stage-1 detector in %s; notebook 02 resolves one itself", run.path)
        return ""

    def _run_sweep(self, run: RunDirectory, record: dict[str, Any]) -> bool:
        plan = self.plan
        assert plan.sweep is not None
        key, values, passed_as = plan.sweep
        stages = [s for s in plan.stages if s.number > 1]
        detector = self._detector_for_sweep(run)
        all_ok = True
        for raw, value in values:
            sub = RunDirectory(self._sweep_dir(run, key, raw), command=_command_line(self.argv))
            label = f"{key}={value}"
            say(f"==> SWEEP {label}  [{sub.path}]")
            params = {n: dict(plan.params[n]) for n in (2, 3)}
            for n in (2, 3):
                decl = plan.declared.get(n, {})
                params[n]["run_dir"] = str(sub.path)
                if "stage1_checkpoint" in decl:
                    params[n]["stage1_checkpoint"] = detector
                if passed_as == "parameter" and key in decl:
                    params[n][key] = _coerce_param(key, value, raw, decl[key], _BY_NUMBER[n].notebook)
            if passed_as == "override":
                ov = key if "." in key else f"xai.{key}"
                text = repr(value) if isinstance(value, float) else raw
                params[2]["overrides"] = list(params[2].get("overrides", [])) + [f"{ov}={text}"]
            try:
                sub.acquire()
            except RunDirectoryError as exc:
                raise PipelineError(str(exc)) from None
            t0 = time.monotonic()
            sub_record: dict[str, Any] | None = None
            try:
                previous = sub.read_record()
                self._check_overwrite(sub, previous, stages)
                sub_record = self._new_record(sub, previous, stages,
                                              {"parent_run": str(run.path), "sweep_value": {key: value}})
                sub_record["stages"]["stage1"] = {"status": "skipped", "reason": "the sweep's shared Stage-1 detector",
                                                  "detector": detector or None}
                sub.write_record(sub_record)
                self._copy_configs(sub, stages)
                ok = self._run_chain(sub, sub_record, stages, params, prefix=f"{label}: ")
                self._finish_record(sub, sub_record, "finished" if ok else "failed", t0)
            except KeyboardInterrupt:
                if sub_record is not None:
                    for entry in sub_record["stages"].values():
                        if entry.get("status") == "running":
                            entry["status"] = "failed"
                    self._finish_record(sub, sub_record, "interrupted", t0)
                raise
            finally:
                sub.release()
            record["sweep"]["runs"][raw] = {"dir": str(sub.path), "status": "finished" if ok else "failed"}
            run.write_record(record)
            all_ok &= ok
        md, png = write_sweep_comparison(run.path / "sweep", key, [r for r, _ in values])
        record["sweep"]["comparison"] = {"markdown": str(md), "figure": str(png) if png else None}
        run.write_record(record)
        say(f"Sweep comparison: {md}" + (f" and {png}" if png else ""))
        say(md.read_text())
        return all_ok

    # ------------------------------------------------------------------ summary
    def _print_summary(self, run: RunDirectory, record: Mapping[str, Any] | None) -> None:
        metrics = run.read_metrics()
        out = ["", f"Run directory: {run.path}"]
        if record:
            out.append("  stages:  " + ", ".join(f"{k} {v.get('status')}" for k, v in record.get("stages", {}).items()))
        out.append(f"  run record:         {run.record_path}")
        if run.metrics_path.exists():
            out.append(f"  metrics:            {run.metrics_path}")
        out.append(f"  executed notebooks: {run.path / 'notebooks'}")
        if (run.path / "figures").is_dir():
            out.append(f"  figures:            {run.path / 'figures'}")
        if (run.path / "logs").is_dir() or self.plan.demo:
            out.append(f"  TensorBoard:        tensorboard --logdir {_display_path(run.path / 'logs')}")
        if (run.path / "sweep" / "comparison.md").exists():
            out.append(f"  sweep comparison:   {run.path / 'sweep' / 'comparison.md'}")
        if self.plan.demo:
            out.append("  viewer:             make lab  (JupyterLab; the importance viewer is in notebook 03)")
        if metrics:
            out += ["", format_metrics_summary(metrics)]
        say("\n".join(out))


def _failing_line(traceback: Sequence[str] | None, exec_count: int | None) -> int | None:
    """The line of the failing cell named in an IPython traceback (``Cell In[7], line 12``)."""
    from papermill.exceptions import strip_color

    text = strip_color("\n".join(traceback or []))
    cell = re.escape(str(exec_count)) if exec_count is not None else r"\d+"
    hits = re.findall(rf"Cell In\[{cell}\], line (\d+)", text)
    return int(hits[-1]) if hits else None


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ============================================================================ sweep outputs


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"
    return "–" if v is None else str(v)


def _stage3_methods(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    metrics = RunDirectory(run_dir).read_metrics()
    methods = (metrics.get("stage3") or {}).get("methods") if isinstance(metrics.get("stage3"), dict) else None
    return methods if isinstance(methods, dict) else None


def write_sweep_comparison(sweep_dir: str | Path, key: str, values: Sequence[str]) -> tuple[Path, Path | None]:
    """Write ``comparison.md`` (and ``comparison.png``) comparing the sweep's Stage-3 metrics.

    Reads ``sweep_dir/<key>=<value>/metrics.json["stage3"]["methods"]`` of each value.

    Args:
        sweep_dir: the ``run_dir/sweep`` folder.
        key: the swept key.
        values: the values as written in the folder names (``KEY=VALUE``).

    Returns:
        The markdown path and the figure path (None when no value has Stage-3 metrics).
    """
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    data: dict[str, dict[str, dict[str, Any]]] = {}
    for raw in values:
        methods = _stage3_methods(sweep_dir / f"{key}={raw}")
        if not methods:
            rows.append(f"| {raw} | (no Stage-3 metrics: see {key}={raw}/run.json) |" + " |" * len(COMPARISON_METRICS))
            continue
        data[raw] = methods
        for name, m in methods.items():
            m = m if isinstance(m, dict) else {}
            rows.append(f"| {raw} | {name} | " + " | ".join(_fmt(m.get(c)) for c in COMPARISON_METRICS) + " |")
    header = f"| {key} | method | " + " | ".join(COMPARISON_METRICS) + " |"
    sep = "|" + "---|" * (len(COMPARISON_METRICS) + 2)
    hints = ", ".join(f"{c}: {h}" for c, h in _METRIC_HINT.items())
    md = sweep_dir / "comparison.md"
    md.write_text(
        f"# Sweep over `{key}`\n\nStage-3 explanation metrics per value and method ({hints}).\n\n"
        + "\n".join([header, sep, *rows]) + "\n"
    )
    png = _plot_comparison(sweep_dir / "comparison.png", key, data) if data else None
    return md, png


def _plot_comparison(path: Path, key: str, data: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Path:
    """Grouped bars: one panel per metric, methods on x, one bar per swept value."""
    import numpy as np
    from matplotlib.figure import Figure

    methods: list[str] = []
    for per_method in data.values():
        methods += [m for m in per_method if m not in methods]
    values = list(data)
    fig = Figure(figsize=(4.2 * 3, 3.4 * 2), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    x = np.arange(len(methods))
    width = 0.8 / max(len(values), 1)
    for ax, metric in zip(axes, COMPARISON_METRICS):
        for i, v in enumerate(values):
            ys = [data[v].get(m, {}).get(metric) if isinstance(data[v].get(m), dict) else None for m in methods]
            ys = [float(y) if isinstance(y, (int, float)) and not isinstance(y, bool) else np.nan for y in ys]
            ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width, label=f"{key}={v}")
        ax.set_title(f"{metric} ({_METRIC_HINT[metric]})", fontsize=9)
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sweep over {key}: Stage-3 metrics")
    fig.savefig(path, dpi=100)
    return path


# ============================================================================ summary


_PREFERRED = ("eval_eer", "dev_eer", "eer", "eval_min_tdcf", "min_tdcf", "best_dev_loss", "dev_loss",
              "representation", "prototype_mode", "epochs_completed", "train_seconds")


def format_metrics_summary(metrics: Mapping[str, Any], max_items: int = 6) -> str:
    """A short text table of ``metrics.json``: a few scalars per stage, Stage-3 per method."""
    lines = ["metrics.json summary"]
    for key, block in metrics.items():
        if not isinstance(block, Mapping):
            lines.append(f"  {key:<8} {_fmt(block)}")
            continue
        methods = block.get("methods")
        if isinstance(methods, Mapping) and methods:
            cols = [c for c in COMPARISON_METRICS if any(isinstance(m, Mapping) and c in m for m in methods.values())]
            lines.append(f"  {key:<8} {'method':<20}" + "".join(f"{c:>15}" for c in cols))
            for name, m in methods.items():
                m = m if isinstance(m, Mapping) else {}
                lines.append(f"  {'':<8} {str(name):<20}" + "".join(f"{_fmt(m.get(c)):>15}" for c in cols))
            continue
        scalars = {k: v for k, v in block.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                   and (not isinstance(v, str) or len(v) <= 24)}
        order = [k for k in _PREFERRED if k in scalars] + [k for k in scalars if k not in _PREFERRED]
        shown = "   ".join(f"{k} {_fmt(scalars[k])}" for k in order[:max_items])
        lines.append(f"  {key:<8} {shown or '(no scalar metrics)'}")
    return "\n".join(lines)


# ============================================================================ planning


def _select_stages(args: argparse.Namespace) -> list[Stage]:
    chosen = [st for st in STAGES if getattr(args, f"stage{st.number}")]
    return chosen or list(STAGES)


def _inspect(notebook: Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares: papermill's inspection, completed from the cell's AST.

    papermill skips a parameter line holding a second ``=`` (e.g. ``# e.g. ["lr=1e-4"]`` in
    its comment); such names are still read here (and a warning names the line to fix).
    """
    import nbformat
    import papermill as pm

    try:
        declared = dict(pm.inspect_notebook(str(notebook)))
        nb = nbformat.read(str(notebook), as_version=4)
    except Exception as exc:
        raise PipelineError(f"cannot read the parameters of {notebook}: {type(exc).__name__}: {exc}") from None
    cell = next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        log.warning("%s has no cell tagged 'parameters'; no parameter can be passed to it", notebook.name)
        return declared
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as exc:
        raise PipelineError(f"{notebook}: the parameters cell is not valid Python (line {exc.lineno}: {exc.msg})") from None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, tp, value = node.target.id, ast.unparse(node.annotation), node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, tp, value = node.targets[0].id, "None", node.value
        else:
            continue
        if name not in declared:
            log.warning("%s: papermill cannot parse the parameter line of %r (a '=' in its comment?); "
                        "it is still passed", notebook.name, name)
            declared[name] = {"name": name, "inferred_type_name": tp,
                              "default": ast.unparse(value) if value is not None else None, "help": ""}
    return declared


def _abs(path: str | Path, cwd: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (cwd / p).absolute()


def _resolve_config(given: str | None, default: str, cwd: Path, flag: str) -> Path:
    if given:
        p = _abs(given, cwd)
        if not p.is_file():
            raise PipelineError(f"{flag} {given}: no such file ({p}); pass an existing YAML file, e.g. {default}")
        return p
    p = cwd / default if (cwd / default).is_file() else PROJECT_ROOT / default
    if not p.is_file():
        raise PipelineError(f"default config {default} not found (looked in {cwd} and {PROJECT_ROOT}); pass {flag} FILE")
    return Path(p).absolute()


def _parse_sweep(spec: str, declared02: Mapping[str, Any], declared03: Mapping[str, Any]
                 ) -> tuple[str, list[tuple[str, Any]], str]:
    if "=" not in spec:
        raise PipelineError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. --sweep prototype_mode=ema,fixed,learnable)")
    key, _, rest = spec.partition("=")
    key = key.strip()
    raws = [v.strip() for v in rest.split(",") if v.strip()]
    if not key or not raws:
        raise PipelineError(f"--sweep {spec!r}: expected KEY=V1,V2,... with at least one value")
    if len(set(raws)) != len(raws):
        raise PipelineError(f"--sweep {spec!r}: a value is repeated")
    if any("/" in r or r in (".", "..") for r in raws):
        raise PipelineError(f"--sweep {spec!r}: values become folder names and may not contain '/'")
    if key in _RESERVED_PARAMS or key in ("stage1_checkpoint", "stage2_checkpoint"):
        raise PipelineError(f"--sweep {key}: this parameter cannot be swept")
    values = [(r, parse_param_value(r)) for r in raws]
    if "." not in key and (key in declared02 or key in declared03):
        return key, values, "parameter"
    if "." not in key:
        from xai_lib.config import XAIConfig

        xai_fields = [f.name for f in dataclasses.fields(XAIConfig)]
        if key not in xai_fields:
            raise PipelineError(
                f"--sweep {key}: neither a parameter of notebook 02/03 ({', '.join(sorted(declared02)) or 'none'}) "
                f"nor an xai.* config key ({', '.join(xai_fields)}); use a dotted key (e.g. training.lr) for other sections"
            )
    return key, values, "override"


_OVERRIDE_SECTIONS = {1: ("training.", "data.", "model."), 2: ("training.", "data.", "xai.", "detector."), 3: ("data.",)}


def _overrides_for(stage: int, overrides: Sequence[str]) -> list[str]:
    """The ``--override`` entries that belong to ``stage``'s config schema.

    ``model.*`` goes to Stage 1, ``xai.*``/``detector.*`` to Stage 2, ``training.*`` to
    both, ``data.*`` to all three (Stage 3 explains the data the run trained with).
    """
    return [ov for ov in overrides if ov.split("=", 1)[0].strip().startswith(_OVERRIDE_SECTIONS[stage])]


def _check_configs(configs: Mapping[int, Path], overrides: Sequence[str]) -> None:
    """Load each stage config with its overrides, so a bad key or value stops the pipeline
    before anything runs. The notebooks read every hyper-parameter from these configs
    themselves (their parameters default to ``None``: the config's value)."""
    from xai_lib.config import ConfigError, Stage1Config, Stage2Config, load_config

    for n, schema in ((1, Stage1Config), (2, Stage2Config)):
        if n in configs:
            try:
                load_config(configs[n], schema, _overrides_for(n, overrides))
            except ConfigError as exc:
                raise PipelineError(str(exc)) from None


def _make_plan(args: argparse.Namespace) -> _Plan:
    cwd = _abs(args.cwd, Path.cwd()) if args.cwd else Path.cwd().absolute()
    if not cwd.is_dir():
        raise PipelineError(f"--cwd {args.cwd}: not a directory")
    stages = _select_stages(args)
    if args.sweep and not any(st.number > 1 for st in stages):
        raise PipelineError("--sweep runs Stage 2/3 once per value; select --stage2 and/or --stage3 (or no stage flag)")
    notebooks_dir = _abs(args.notebooks_dir, cwd) if args.notebooks_dir else default_notebooks_dir()
    needed = sorted({st.number for st in stages} | ({2, 3} if args.sweep else set()))
    missing = [_BY_NUMBER[n].notebook for n in needed if not (notebooks_dir / _BY_NUMBER[n].notebook).is_file()]
    if missing:
        raise PipelineError(f"notebook(s) not found in {notebooks_dir}: {', '.join(missing)} (pass --notebooks-dir)")
    declared = {st.number: _inspect(notebooks_dir / st.notebook) for st in STAGES
                if (notebooks_dir / st.notebook).is_file()}

    # ---- run directory
    if args.run_dir:
        run_dir = _abs(args.run_dir, cwd)
    elif args.demo:
        run_dir = _abs(_DEMO_RUN_DIR, cwd)
    else:
        run_dir = _abs(default_run_dir(cwd / "outputs"), cwd)

    # ---- configs / data
    configs: dict[int, Path] = {}
    demo_stage2 = (_DEMO_CONFIG_STAGE2 if args.demo and any((d / _DEMO_CONFIG_STAGE2).is_file() for d in (cwd, PROJECT_ROOT))
                   else None)
    if 1 in needed:
        configs[1] = _resolve_config(args.config_stage1, _DEFAULT_CONFIG_STAGE1, cwd, "--config-stage1")
    if 2 in needed:
        configs[2] = _resolve_config(args.config_stage2, demo_stage2 or _DEFAULT_CONFIG_STAGE2, cwd, "--config-stage2")
    data_root = str(_abs(args.data_root, cwd)) if args.data_root else None
    if args.demo and data_root is None:
        data_root = str(_abs(_DEMO_CORPUS, cwd))

    # ---- overrides
    for ov in args.override:
        if "=" not in ov or not ov.split("=", 1)[0].strip():
            raise PipelineError(f"--override {ov!r}: expected KEY=VALUE with a dotted key (e.g. training.lr=1e-4)")
        if not any(ov.strip().startswith(p) for ps in _OVERRIDE_SECTIONS.values() for p in ps):
            raise PipelineError(
                f"--override {ov!r}: the key must start with model., xai., detector., training. or data."
            )

    # ---- base parameters (only names a notebook declares are passed)
    base: dict[int, dict[str, Any]] = {n: {} for n in (1, 2, 3)}
    base[1].update(config_path=str(configs[1]) if 1 in configs else None)
    base[2].update(config_path=str(configs[2]) if 2 in configs else None, stage1_checkpoint="")
    base[3].update(stage1_checkpoint="", stage2_checkpoint="")
    for n in (1, 2, 3):
        base[n]["run_dir"] = str(run_dir)
        if data_root is not None:
            base[n]["data_root"] = data_root
        if args.smoke:
            base[n]["smoke"] = True
        base[n]["overrides"] = []
        if n in (1, 2):  # --overwrite trains afresh; otherwise an interrupted stage resumes from its state
            base[n]["resume"] = not args.overwrite

    _check_configs(configs, args.override)

    # ---- -p NAME VALUE
    user: dict[str, tuple[str, Any]] = {}
    for name, raw in args.param:
        if name in _RESERVED_PARAMS:
            raise PipelineError(f"-p {name}: set it with {_RESERVED_PARAMS[name]}")
        owners = [n for n in (1, 2, 3) if name in declared.get(n, {})]
        if not owners:
            listing = "; ".join(f"{_BY_NUMBER[n].notebook}: {', '.join(d) or '-'}" for n, d in declared.items())
            raise PipelineError(f"-p {name}: no notebook declares a parameter {name!r} (declared: {listing})")
        value = parse_param_value(raw)
        if name in _PATH_PARAMS and isinstance(value, str) and value:
            value = raw = str(_abs(value, cwd))
        user[name] = (raw, value)
    params: dict[int, dict[str, Any]] = {}
    for n in (1, 2, 3):
        decl = declared.get(n, {})
        p = {k: v for k, v in base[n].items() if k in decl and v is not None}
        for name, (raw, value) in user.items():
            if name in decl:
                p[name] = _coerce_param(name, value, raw, decl[name], _BY_NUMBER[n].notebook)
        if "overrides" in decl and args.override:
            p["overrides"] = list(p.get("overrides") or []) + _overrides_for(n, args.override)
        params[n] = p
    unused = [name for name in user if not any(name in declared.get(st.number, {}) for st in stages)]
    for name in unused:
        log.warning("-p %s: no selected stage declares it; ignored", name)

    sweep = _parse_sweep(args.sweep, declared.get(2, {}), declared.get(3, {})) if args.sweep else None
    if sweep and sweep[2] == "parameter":  # check every value against the declared type now, not mid-run
        for raw, value in sweep[1]:
            for n in (2, 3):
                if sweep[0] in declared.get(n, {}):
                    _coerce_param(sweep[0], value, raw, declared[n][sweep[0]], _BY_NUMBER[n].notebook)
    return _Plan(
        stages=stages, run_dir=run_dir, notebooks_dir=notebooks_dir, cwd=cwd, kernel=resolve_kernel(args.kernel),
        declared=declared, params=params, configs=configs, data_root=data_root, sweep=sweep, overwrite=args.overwrite,
        progress=not args.no_progress, log_output=args.log_output, demo=args.demo,
    )


def _prepare_demo(plan: _Plan, args: argparse.Namespace) -> None:
    """Generate the demo corpus if absent; archive a finished outputs/demo before a full run."""
    corpus = Path(plan.data_root or _abs(_DEMO_CORPUS, plan.cwd))
    if not args.data_root:
        # generate_corpus reuses a complete corpus of the same seed, size and generator
        # version in well under a second, and (re)builds a missing, partial or outdated one
        from xai_lib.data.synthetic import generate_corpus

        say(f"Demo corpus: {corpus}")
        t0 = time.monotonic()
        generate_corpus(corpus, seed=0, size="demo", progress=False)
        say(f"    ready ({time.monotonic() - t0:.1f} s)")
    run = RunDirectory(plan.run_dir)
    full = len(plan.stages) == len(STAGES)
    if full and run.path.is_dir() and any(run.path.iterdir()):
        holder = run.holder()
        if holder is not None:
            raise PipelineError(run.lock._busy_message(holder))
        target = run.archive()
        msg = f"kept the previous demo run: {run.path} -> {target}"
        log.info(msg)
        say(msg)


class _PapermillNoise(logging.Filter):
    """Drop papermill's parameter-parsing warnings: the runner checks every name itself
    (:func:`_inspect` reads the lines papermill cannot and warns once, naming them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Passed unknown parameter") or msg.startswith("Unable to parse line"))


def _setup_logging(verbose_papermill: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("papermill").setLevel(logging.INFO if verbose_papermill else logging.WARNING)
    for name in ("papermill", "papermill.translators"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _PapermillNoise) for f in lg.filters):
            lg.addFilter(_PapermillNoise())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m xai_lib.pipeline`` / ``xai-pipeline``; returns the exit code.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_output)
    restore = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        restore = signal.signal(signal.SIGTERM, _on_term)
    try:
        plan = _make_plan(args)
        if args.demo:
            _prepare_demo(plan, args)
        return _Pipeline(plan, argv).run()
    except PipelineError as exc:
        say_error(f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        say_error("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


if __name__ == "__main__":
    sys.exit(main())

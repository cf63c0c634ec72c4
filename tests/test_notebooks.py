"""The shipped notebooks: committed clean, paired with their jupytext scripts, and run for real.

Two paths reach them: a user's Run All in JupyterLab (the notebooks' own defaults) and the
pipeline (papermill with the parameters it must pass). Both are executed here on a tiny
corpus with ``smoke=True``, and both must resolve the same configs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from xai_lib.config import config_to_dict
from xai_lib.detector import stage1_config
from xai_lib.importance import stage2_config
from xai_lib.pipeline import _make_plan, build_parser, default_notebooks_dir, resolve_kernel

NOTEBOOKS = sorted(default_notebooks_dir().glob("0*.ipynb"))
pytestmark = pytest.mark.timeout(900)


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def _defaults(path: Path) -> dict:
    """The values of a notebook's parameters cell, as Run All sees them."""
    namespace: dict = {}
    exec(_parameters_cell(nbformat.read(path, as_version=4)).source, namespace)  # noqa: S102 - our own file
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


def test_three_notebooks_are_shipped():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs_and_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
    source = _parameters_cell(nb).source
    # every line of the parameters cell is an annotated literal papermill can read
    declared = pm.inspect_notebook(str(path))
    names = [line.split(":")[0].strip() for line in source.splitlines() if line.strip() and not line.startswith("#")]
    assert names and set(names) == set(declared), set(names) ^ set(declared)
    assert all(declared[n]["help"] for n in names), "every parameter has a comment"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_and_its_jupytext_script_are_in_sync(path):
    import jupytext

    script = path.with_suffix(".py")
    assert script.is_file(), f"{script.name} (jupytext percent format) is missing; run `make notebooks`"
    a, b = jupytext.read(path), jupytext.read(script)
    assert [(c.cell_type, c.source.strip()) for c in a.cells] == [(c.cell_type, c.source.strip()) for c in b.cells], (
        f"{path.name} and {script.name} differ: edit the .py and run `make notebooks`")


def test_pipeline_and_run_all_resolve_the_same_configs(tmp_path):
    """`make demo` (the pipeline) and Run All by hand: the same configs, so the same metrics."""
    root = default_notebooks_dir().parent  # `make demo` runs from the repository root
    plan = _make_plan(build_parser().parse_args(["--demo", "--cwd", str(root), "--run-dir", str(tmp_path / "demo")]))
    by_hand = {n: _defaults(p) for n, p in zip((1, 2, 3), NOTEBOOKS)}
    piped = {n: {**by_hand[n], **plan.params[n]} for n in (1, 2, 3)}
    for n, resolve in ((1, stage1_config), (2, stage2_config)):
        args = {k: v for k, v in by_hand[n].items() if k in resolve.__code__.co_varnames}
        piped_args = {k: v for k, v in piped[n].items() if k in resolve.__code__.co_varnames}
        assert config_to_dict(resolve(**args)) == config_to_dict(resolve(**piped_args)), f"notebook 0{n}"
    # what differs is only where the products go
    for n in (1, 2, 3):
        assert {k for k in piped[n] if piped[n][k] != by_hand[n][k]} <= {"run_dir", "data_root", "config_path"}
    assert by_hand[1]["run_dir"] == by_hand[2]["run_dir"] == by_hand[3]["run_dir"]


def _papermill(path: Path, out: Path, cwd: Path, parameters: dict) -> None:
    pm.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(cwd), kernel_name=resolve_kernel(),
                        progress_bar=False, log_output=False)


def test_run_all_by_hand_with_the_defaults_and_smoke(tmp_path, tiny_corpus):
    """Notebooks 01 → 02 → 03 with nothing but smoke=True, from a working directory whose
    outputs/data/demo_corpus is a tiny corpus: 02 and 03 find 01's products by themselves."""
    (tmp_path / "outputs" / "data").mkdir(parents=True)
    shutil.copytree(tiny_corpus, tmp_path / "outputs" / "data" / "demo_corpus")
    for path in NOTEBOOKS:
        _papermill(path, tmp_path / path.name, tmp_path, {"smoke": True})
    run_dir = tmp_path / "outputs" / "lab"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"stage1", "stage2", "stage3"}
    assert (run_dir / "stage1_detector.pth").is_file() and (run_dir / "stage2_xai.pth").is_file()
    assert set(metrics["stage3"]["methods"]) == set(_defaults(NOTEBOOKS[2])["methods"])
    assert list((run_dir / "figures").glob("stage3_*.png"))


# The pipeline running the real notebooks end to end: tests/test_data_layout.py (on a relocated corpus).

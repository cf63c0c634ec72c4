"""The importance viewer as a user meets it: notebook 03 run in JupyterLab in headless Chromium.

The test makes a small demo run itself (``python -m xai_lib.pipeline --smoke`` for Stages 1
and 2 on a tiny generated corpus), injects smoke parameters into a copy of
``notebooks/03_attribution_visualization.ipynb`` (papermill, prepare-only: nothing is
executed outside the browser), opens the copy in JupyterLab, runs all cells from the
"Run" menu and then works the viewer through the browser:

- the viewer renders: the overlay figure and an ``<audio>`` player (autoplay off);
- choosing another utterance, then another method, in the ``<select>`` pickers redraws the
  figure (the figure's bytes differ), and the audio follows the utterance;
- the "Save PNG" button writes a PNG file on disk.

Screenshots go to the test's output folder and to ``outputs/e2e/``.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .conftest import HUMAN_OUTPUT_DIR, REPO_ROOT, JupyterLabServer, publish_for_humans

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

NOTEBOOK_03 = REPO_ROOT / "notebooks" / "03_attribution_visualization.ipynb"

PIPELINE_TIMEOUT_S = 900.0  # the smoke Stage 1 + Stage 2 run (2 shared CPU cores)
NOTEBOOK_OPEN_TIMEOUT_S = 120.0  # JupyterLab loaded, notebook shown, kernel idle
RUN_ALL_TIMEOUT_S = 600.0  # "Run All Cells" until the viewer is shown and the kernel idle
REDRAW_TIMEOUT_S = 180.0  # one picker change until the figure differs
SAVE_TIMEOUT_S = 60.0  # click on "Save PNG" until the file is on disk
POLL_S = 0.5

# ============================================================================ notebooks


@dataclass
class ViewerNotebook:
    """A notebook prepared for the browser.

    Attributes:
        relative_path: path below the server's root directory.
        kind: what it is, for messages (``"notebook 03"``).
        watch_dirs: folders where a saved PNG may appear.
        parameters: the injected parameters.
    """

    relative_path: str
    kind: str
    watch_dirs: list[Path]
    parameters: dict[str, Any]


def _prepare(source: Path, target: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """Copy ``source`` to ``target`` with ``parameters`` injected (papermill, nothing executed).

    Only the parameters the notebook declares are injected; returns those.
    """
    import papermill

    declared = papermill.inspect_notebook(str(source))
    injected = {k: v for k, v in parameters.items() if k in declared}
    papermill.execute_notebook(str(source), str(target), parameters=injected, prepare_only=True,
                               kernel_name="python3", progress_bar=False, log_output=False)
    return injected


def _smoke_run(run_dir: Path, corpus: Path, log_path: Path) -> None:
    """Stages 1 and 2 of the smoke pipeline into ``run_dir`` on a tiny generated corpus."""
    from xai_lib.data.synthetic import generate_corpus

    generate_corpus(corpus, seed=0, size="tiny")
    cmd = [sys.executable, "-m", "xai_lib.pipeline", "--smoke", "--stage1", "--stage2",
           "--run-dir", str(run_dir), "--data-root", str(corpus), "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=PIPELINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            pytest.fail(f"the smoke pipeline did not finish within {PIPELINE_TIMEOUT_S:.0f} s; log {log_path}:\n"
                        f"{log_path.read_text(errors='replace')[-3000:]}", pytrace=False)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    if rc != 0:
        pytest.fail(f"{' '.join(cmd[2:])} failed with exit code {rc}; log {log_path}:\n"
                    f"{log_path.read_text(errors='replace')[-3000:]}", pytrace=False)


@pytest.fixture
def viewer_notebook(jupyter_lab: JupyterLabServer, tmp_path: Path) -> ViewerNotebook:
    """The notebook the browser opens, in the server's root: notebook 03 with smoke parameters."""
    root = jupyter_lab.root_dir
    run_dir = tmp_path / "smoke-run"
    corpus = tmp_path / "corpus"
    _smoke_run(run_dir, corpus, tmp_path / "pipeline.log")
    parameters = {
        "stage1_checkpoint": str(run_dir / "stage1_detector.pth"),
        "stage2_checkpoint": str(run_dir / "stage2_xai.pth"),
        "data_root": str(corpus),
        "run_dir": str(run_dir),
        "smoke": True,
        "seed": 0,
        "num_utterances": 4,
        "sanity": False,  # the viewer is under test here; the sanity section runs in tests/test_notebooks.py
    }
    injected = _prepare(NOTEBOOK_03, root / NOTEBOOK_03.name, parameters)
    return ViewerNotebook(NOTEBOOK_03.name, "notebook 03", [run_dir, root], injected)


# ============================================================================ browser helpers

#: Finds the viewer (the output holding an <audio> and a <select>) and describes it.
_VIEWER_STATE_JS = r"""
() => {
  const outputs = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')];
  const errors = outputs.map(o => o.innerText || '')
      .filter(t => /Traceback \(most recent call last\)|Error displaying widget|^\w*Error: /m.test(t))
      .map(t => t.slice(-4000));
  const root = outputs.find(o => o.querySelector('audio') && o.querySelector('select'));
  document.querySelectorAll('[data-e2e-viewer]').forEach(e => { if (e !== root) e.removeAttribute('data-e2e-viewer'); });
  if (!root) return {found: false, errors};
  root.setAttribute('data-e2e-viewer', '1');
  const selects = [...root.querySelectorAll('select')].map(s => {
    const box = s.closest('.widget-dropdown, .jupyter-widgets') || s.parentElement;
    const label = box ? (box.querySelector('label') || {}).innerText || '' : '';
    return {label: label.trim(), options: [...s.options].map(o => o.text), selectedIndex: s.selectedIndex};
  });
  const audio = root.querySelector('audio');
  const buttons = [...root.querySelectorAll('button')].map(b => (b.innerText || b.title || '').trim());
  return {found: true, errors, selects, buttons, text: root.innerText,
          audio: {src: audio.getAttribute('src') || '', autoplay: audio.autoplay}};
}
"""

#: The drawn figure: the largest <img>/<canvas> of the viewer, hashed (SHA-256 of its bytes).
_FIGURE_DIGEST_JS = r"""
async () => {
  const root = document.querySelector('[data-e2e-viewer]');
  if (!root) return null;
  let best = null, bestArea = 0;
  for (const el of root.querySelectorAll('img, canvas')) {
    const r = el.getBoundingClientRect();
    const area = r.width * r.height;
    if (area > bestArea) { best = el; bestArea = area; }
  }
  if (!best || bestArea < 100 * 50) return null;
  if (best.tagName === 'IMG' && !best.complete) return null;
  let bytes;
  if (best.tagName === 'CANVAS') {
    bytes = new TextEncoder().encode(best.toDataURL('image/png'));
  } else {
    const src = best.getAttribute('src') || '';
    if (!src) return null;
    try { bytes = new Uint8Array(await (await fetch(src)).arrayBuffer()); } catch (e) { return null; }
  }
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  const r = best.getBoundingClientRect();
  return {tag: best.tagName.toLowerCase(), size: bytes.length, width: Math.round(r.width),
          height: Math.round(r.height), sha256: [...digest].map(b => b.toString(16).padStart(2, '0')).join('')};
}
"""

#: SHA-256 of the audio player's current data.
_AUDIO_DIGEST_JS = r"""
async () => {
  const a = document.querySelector('[data-e2e-viewer] audio');
  const src = a && a.getAttribute('src');
  if (!src) return null;
  try {
    const bytes = new Uint8Array(await (await fetch(src)).arrayBuffer());
    const d = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
    return [...d].map(b => b.toString(16).padStart(2, '0')).join('');
  } catch (e) { return null; }
}
"""


def _wait_for(what: str, timeout_s: float, probe: Callable[[], Any], on_timeout: Callable[[], str] = lambda: "") -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}. {on_timeout()}", pytrace=False)
        time.sleep(POLL_S)


def _notebook_kernel_state(server: JupyterLabServer, relative_path: str) -> str | None:
    for session in server.api("/api/sessions") or []:
        if session.get("path", "").endswith(relative_path):
            return (session.get("kernel") or {}).get("execution_state")
    return None


def _accept_dialogs(page: Any) -> list[str]:
    """Accept any modal JupyterLab dialog (e.g. kernel selection); returns their texts."""
    texts = []
    for dialog in page.locator(".jp-Dialog").all():
        if dialog.is_visible():
            texts.append(dialog.inner_text())
            dialog.locator(".jp-Dialog-button.jp-mod-accept").first.click()
    return texts


def _run_all_cells(page: Any) -> None:
    """Run → Run All Cells, through JupyterLab's menu bar."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).first.click()
    item = page.locator('.lm-Menu-item[data-command="notebook:run-all-cells"]')
    if item.count() == 0:
        item = page.locator(".lm-Menu-item", has_text=re.compile(r"^\s*Run All Cells"))
    item.first.click()


def _fail_on_errors(page: Any, nb: ViewerNotebook) -> dict[str, Any]:
    """The viewer state; fails the test at once when an output shows a traceback or an error line."""
    state = page.evaluate(_VIEWER_STATE_JS)
    if state["errors"]:
        pytest.fail(f"{nb.kind} raised in the browser:\n{state['errors'][0]}", pytrace=False)
    return state


def _pick(state: dict[str, Any], pattern: str, fallback: int) -> int:
    """Index of the <select> whose label matches ``pattern`` (else ``fallback``)."""
    for i, s in enumerate(state["selects"]):
        if re.search(pattern, s["label"], re.I):
            return i
    return fallback


def _png_files(dirs: list[Path]) -> dict[Path, int]:
    files: dict[Path, int] = {}
    for d in dirs:
        if d.is_dir():
            for p in d.rglob("*.png"):
                with contextlib.suppress(OSError):
                    files[p.resolve()] = p.stat().st_mtime_ns
    return files


@contextlib.contextmanager
def _screenshot_on_failure(page: Any, out_dir: Path, server: JupyterLabServer) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            shot = out_dir / "viewer_failure.png"
            page.screenshot(path=str(shot))
            copy = publish_for_humans(shot)
            sys.stderr.write(f"\nfailure screenshot: {shot} (copy: {copy})\n"
                             f"JupyterLab log tail:\n{server.log_tail(2000)}\n")
        raise


# ============================================================================ the test


def test_viewer_in_jupyterlab(chromium_executable: str, jupyter_lab: JupyterLabServer,
                              viewer_notebook: ViewerNotebook, browser_page: Any, e2e_output_dir: Path) -> None:
    """A user runs notebook 03 in JupyterLab and works the viewer: pickers redraw, Save PNG writes."""
    page, server, nb = browser_page, jupyter_lab, viewer_notebook
    t0 = time.monotonic()
    with _screenshot_on_failure(page, e2e_output_dir, server):
        page.goto(server.lab_url(nb.relative_path), wait_until="domcontentloaded",
                  timeout=NOTEBOOK_OPEN_TIMEOUT_S * 1000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=NOTEBOOK_OPEN_TIMEOUT_S * 1000)
        _wait_for("the notebook's kernel to be idle", NOTEBOOK_OPEN_TIMEOUT_S,
                  lambda: (_accept_dialogs(page), _notebook_kernel_state(server, nb.relative_path))[1] == "idle",
                  lambda: f"kernel state: {_notebook_kernel_state(server, nb.relative_path)}")
        _accept_dialogs(page)
        _run_all_cells(page)

        # ---- the viewer renders: figure + audio (autoplay off) + two pickers + save button
        def viewer_ready() -> dict[str, Any] | None:
            state = _fail_on_errors(page, nb)
            if not state["found"] or _notebook_kernel_state(server, nb.relative_path) != "idle":
                return None
            return state if page.evaluate(_FIGURE_DIGEST_JS) else None

        state = _wait_for(f"the viewer of {nb.kind} (after Run All Cells)", RUN_ALL_TIMEOUT_S, viewer_ready,
                          lambda: f"kernel: {_notebook_kernel_state(server, nb.relative_path)}")
        run_all_s = time.monotonic() - t0
        viewer = page.locator("[data-e2e-viewer]")
        assert state["audio"]["src"], "the viewer's <audio> player has no audio loaded"
        assert state["audio"]["autoplay"] is False, "the audio player must not autoplay"
        assert len(state["selects"]) >= 2, f"expected an utterance and a method picker, got {state['selects']}"
        figure0 = page.evaluate(_FIGURE_DIGEST_JS)
        assert figure0["width"] >= 200 and figure0["height"] >= 100, f"figure drawn too small: {figure0}"
        audio0 = page.evaluate(_AUDIO_DIGEST_JS)
        viewer.scroll_into_view_if_needed()
        page.screenshot(path=str(e2e_output_dir / "viewer_initial.png"))

        # ---- another utterance redraws the figure and reloads the audio
        i_utt = _pick(state, r"utter|utt\b|file", 0)
        i_method = _pick(state, r"method|attribution|explain", 1 if i_utt == 0 else 0)
        assert i_utt != i_method, f"cannot tell the utterance and method pickers apart: {state['selects']}"

        def change(index: int, what: str, before: dict[str, Any]) -> dict[str, Any]:
            select = state["selects"][index]
            assert len(select["options"]) >= 2, f"the {what} picker offers only {select['options']}"
            new = (select["selectedIndex"] + 1) % len(select["options"])
            viewer.locator("select").nth(index).select_option(index=new)

            def redrawn() -> dict[str, Any] | None:
                _fail_on_errors(page, nb)
                now = page.evaluate(_FIGURE_DIGEST_JS)
                if now and now["sha256"] != before["sha256"]:
                    return now
                return None

            after = _wait_for(f"the figure to change after picking {what} {select['options'][new]!r}",
                              REDRAW_TIMEOUT_S, redrawn)
            _wait_for("the kernel to be idle", REDRAW_TIMEOUT_S,
                      lambda: _notebook_kernel_state(server, nb.relative_path) == "idle")
            # the last redraw wins: take the figure once the kernel is done
            return _wait_for("the figure", REDRAW_TIMEOUT_S, lambda: page.evaluate(_FIGURE_DIGEST_JS)) or after

        figure1 = change(i_utt, "utterance", figure0)
        assert figure1["sha256"] != figure0["sha256"]
        audio1 = page.evaluate(_AUDIO_DIGEST_JS)
        assert audio1 and audio1 != audio0, "the audio player did not load the newly picked utterance"
        figure2 = change(i_method, "method", figure1)
        assert figure2["sha256"] != figure1["sha256"]

        # ---- "Save PNG" writes a file
        before = _png_files(nb.watch_dirs)
        viewer.locator("button", has_text=re.compile(r"save", re.I)).first.click()

        def saved() -> list[Path]:
            _fail_on_errors(page, nb)
            now = _png_files(nb.watch_dirs)
            return [p for p, mtime in now.items() if before.get(p) != mtime and p.stat().st_size > 0]

        new_files = _wait_for(f"a PNG to be written under {', '.join(map(str, nb.watch_dirs))}", SAVE_TIMEOUT_S, saved)
        for path in new_files:
            _wait_for(f"{path} to be a complete PNG", SAVE_TIMEOUT_S,
                      lambda: path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000)
        shown = page.evaluate(_VIEWER_STATE_JS)["text"]
        shown_paths = re.findall(r"(/\S+?\.png)", shown)
        for p in shown_paths:  # where the viewer says it saved, a file is
            assert Path(p).is_file(), f"the viewer reports {p} but there is no such file"

        viewer.scroll_into_view_if_needed()
        shot = e2e_output_dir / "viewer_jupyterlab.png"
        page.screenshot(path=str(shot))
        viewer.screenshot(path=str(e2e_output_dir / "viewer_widget.png"))
    copies = [publish_for_humans(p) for p in sorted(e2e_output_dir.glob("*.png"))]
    (HUMAN_OUTPUT_DIR / "viewer_failure.png").unlink(missing_ok=True)  # stale from an earlier failure
    sys.stderr.write(
        f"\n[e2e] {nb.kind}: viewer shown {run_all_s:.1f} s after opening; figure {figure0['width']}x"
        f"{figure0['height']} {figure0['tag']}; pickers {[s['label'] for s in state['selects']]}; "
        f"saved {[str(p) for p in new_files]}; screenshots {[str(c) for c in copies]}; "
        f"total {time.monotonic() - t0:.1f} s\n")
    assert shot.stat().st_size > 0

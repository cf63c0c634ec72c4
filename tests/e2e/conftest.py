"""Fixtures of the browser end-to-end tests: a throw-away JupyterLab server and headless Chromium.

Everything runs on the loopback interface with temporary Jupyter config/data/runtime/settings
directories, a random token and a fresh, empty Chromium profile. The server (with every
kernel it started) and the browser are always shut down, also when a test fails.

These tests are marked ``e2e`` and excluded from ``make test``; ``make test-e2e`` runs them
with ``XAI_E2E_REQUIRED=1``, which turns a missing Chromium/Playwright into a failure
instead of a skip.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where humans find the screenshots of the last run.
HUMAN_OUTPUT_DIR = REPO_ROOT / "outputs" / "e2e"
#: The system Chromium (Debian package ``chromium``); override with ``XAI_E2E_CHROMIUM``.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
#: Flags for a headless Chromium on a machine without network access.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
#: The JupyterLab extension that renders ipywidgets (pip package ``jupyterlab_widgets``).
WIDGETS_LABEXTENSION = "@jupyter-widgets/jupyterlab-manager"

SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 15.0


def e2e_required() -> bool:
    """True under ``make test-e2e`` (``XAI_E2E_REQUIRED=1``): missing pieces fail instead of skipping."""
    return os.environ.get("XAI_E2E_REQUIRED", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip the test because ``reason`` — or fail when the e2e run is required."""
    if e2e_required():
        pytest.fail(f"e2e prerequisite missing: {reason} (XAI_E2E_REQUIRED is set; run `make test-e2e` "
                    f"to install Chromium and Playwright)", pytrace=False)
    pytest.skip(f"e2e prerequisite missing: {reason}")


# ============================================================================ browser


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Path of the system Chromium; skip (or fail, if required) when it or Playwright is missing."""
    path = os.environ.get("XAI_E2E_CHROMIUM", DEFAULT_CHROMIUM)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        unavailable(f"no Chromium executable at {path} (apt-get install -y chromium chromium-driver)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        unavailable(f"the Python package playwright is not importable ({exc}); pip install -e '.[e2e]'")
    return path


@pytest.fixture
def browser_page(chromium_executable: str, tmp_path: Path) -> Iterator[Any]:
    """A Playwright page in headless Chromium with a fresh, empty profile; closed afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(profile),
            executable_path=chromium_executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=False,
        )
        try:
            context.set_default_timeout(30_000)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda exc: log.warning("browser page error: %s", exc))
            yield page
        finally:
            context.close()


# ============================================================================ JupyterLab


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class JupyterLabServer:
    """A running JupyterLab server started by :func:`jupyter_lab`.

    Attributes:
        base_url: ``http://127.0.0.1:<port>``.
        token: the random access token.
        root_dir: the server's root directory (notebooks opened in the browser live here).
        log_path: the server's combined stdout/stderr.
        process: the server process (leader of its own process group).
    """

    base_url: str
    token: str
    root_dir: Path
    log_path: Path
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> Any:
        """Call the server's REST API (``path`` like ``/api/sessions``); returns the decoded JSON or None."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def get_text(self, path: str, timeout: float = 30.0) -> str:
        """GET ``path`` with the token; the body as text."""
        req = urllib.request.Request(self.base_url + path, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read().decode("utf-8", "replace")

    def lab_url(self, relative_path: str) -> str:
        """Browser URL that opens ``relative_path`` (relative to :attr:`root_dir`) in JupyterLab."""
        return f"{self.base_url}/lab/tree/{relative_path}?token={self.token}"

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the server log (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "<no server log>"

    def kernel_states(self) -> list[str]:
        """``execution_state`` of every kernel the server runs."""
        return [k.get("execution_state", "?") for k in self.api("/api/kernels") or []]


def _descendants(pid: int) -> list[int]:
    """Ids of all live descendant processes of ``pid`` (read from /proc; [] where /proc is absent)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..." — comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:  # a session/group leader (kernels start their own session)
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_server(server: JupyterLabServer) -> None:
    """Shut the server and all its kernels down: politely via the API, then SIGTERM, then SIGKILL."""
    proc = server.process
    tree = _descendants(proc.pid)  # kernels run in their own sessions, outside the server's group
    if proc.poll() is None:
        try:
            for kernel in server.api("/api/kernels", timeout=5) or []:
                server.api(f"/api/kernels/{kernel['id']}", method="DELETE", timeout=10)
            server.api("/api/shutdown", method="POST", timeout=5)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            log.warning("polite JupyterLab shutdown failed: %s", exc)
        try:
            proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    tree = sorted(set(tree) | set(_descendants(proc.pid)))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        _signal_pids([p for p in tree if _alive(p)], sig)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (proc.poll() is None or any(_alive(p) for p in tree)):
            time.sleep(0.1)
    if proc.poll() is None:
        proc.wait(timeout=5)


def _write_lab_settings(settings_dir: Path) -> None:
    """User settings that keep a fresh JupyterLab quiet: no news/update checks, no toasts in the way."""
    notif = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True, exist_ok=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def server_env(tmp: Path) -> dict[str, str]:
    """Environment of the server and its kernels: the project's venv, Jupyter dirs under ``tmp``."""
    env = dict(os.environ)
    dirs = {
        "JUPYTER_CONFIG_DIR": tmp / "jupyter-config",
        "JUPYTER_DATA_DIR": tmp / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": tmp / "jupyter-runtime",
        "JUPYTERLAB_SETTINGS_DIR": tmp / "lab-user-settings",
        "JUPYTERLAB_WORKSPACES_DIR": tmp / "lab-workspaces",
        "IPYTHONDIR": tmp / "ipython",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    _write_lab_settings(dirs["JUPYTERLAB_SETTINGS_DIR"])
    # No announcement feed fetched by the server (the machine may have no network).
    (dirs["JUPYTER_CONFIG_DIR"] / "jupyter_server_config.py").write_text("c.LabApp.news_url = None\n")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # A user's kernel has no MPLBACKEND: ipykernel then picks the inline backend (the test
    # suite's conftest sets Agg for itself, which must not leak into the browser's kernel).
    env.pop("MPLBACKEND", None)
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_TOKEN", None)
    return env


@pytest.fixture(scope="session")
def jupyter_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterLabServer]:
    """A JupyterLab server of this project's environment on a free loopback port; stopped afterwards."""
    try:
        import jupyterlab  # noqa: F401
    except ImportError as exc:
        unavailable(f"jupyterlab is not importable from {sys.executable} ({exc})")
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "root"
    root.mkdir()
    env = server_env(tmp)
    port = free_loopback_port()
    token = secrets.token_hex(24)
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        "--ServerApp.terminals_enabled=False",
        "--ServerApp.shutdown_no_activity_timeout=1800",  # a last resort should teardown never run
        "--MappingKernelManager.cull_idle_timeout=1800",
        "--LabApp.extension_manager=readonly",  # no PyPI queries (the machine may have no network)
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers/CI often run as root
        cmd.append("--allow-root")
    log_path = tmp / "jupyterlab.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = JupyterLabServer(base_url=f"http://127.0.0.1:{port}", token=token, root_dir=root,
                              log_path=log_path, process=proc, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} while starting "
                            f"({' '.join(cmd[:3])} ...):\n{server.log_tail()}", pytrace=False)
            try:
                server.api("/api/status", timeout=2)
                break
            except (OSError, urllib.error.URLError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer on {server.base_url} within "
                                f"{SERVER_START_TIMEOUT_S:.0f} s:\n{server.log_tail()}", pytrace=False)
                time.sleep(0.5)
        page = server.get_text(f"/lab?token={token}")
        if WIDGETS_LABEXTENSION not in page:
            pytest.fail(f"JupyterLab at {server.base_url} does not load the ipywidgets extension "
                        f"{WIDGETS_LABEXTENSION} (is jupyterlab_widgets installed in {sys.prefix}?); "
                        f"server log:\n{server.log_tail()}", pytrace=False)
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def e2e_output_dir(tmp_path: Path) -> Path:
    """The test's output folder (screenshots); copies go to ``outputs/e2e/`` for humans."""
    out = tmp_path / "e2e-output"
    out.mkdir()
    return out


def publish_for_humans(path: Path) -> Path:
    """Copy ``path`` into ``outputs/e2e/``; returns the copy."""
    HUMAN_OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    target = HUMAN_OUTPUT_DIR / path.name
    shutil.copy2(path, target)
    return target

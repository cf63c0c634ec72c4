# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
COMMA  := ,

.PHONY: setup demo test test-e2e lab bench corpus notebooks clean

# Installs: pip decides, uv installs. pip resolves with this machine's configuration (indexes,
# find-links, constraints) and reports the exact wheel it would take for each package; uv installs
# those files in parallel with bytecode compiled (a fresh ".[dev]": pip's plan 31 s + uv 36 s vs
# pip alone 175 s on a 2-core machine, about 4.5 GB of torch/CUDA wheels). The plan resolves the
# requirements of pyproject.toml rather than ".[dev]": the same wheels, without building the project
# in an isolated environment first (21 s instead of 27 s). uv does not resolve:
# where two indexes hold the same version its own choice can differ (a pure-Python soundfile wheel
# without libsndfile, say). Where uv cannot be had or fails, plain pip does it all.
define PIP_PLAN
import json, subprocess, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"])
for extra in sys.argv[1].split(","):
    reqs += project["optional-dependencies"][extra]
cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", *reqs]
report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
for item in report["install"]:
    print(f"{item['metadata']['name']} @ {item['download_info']['url']}")
endef
export PIP_PLAN
# A fresh environment takes about 7 GiB (torch with its CUDA libraries); a full disk otherwise shows
# up as a failure deep inside pip or uv. This says so up front (a warning: with uv's cache already
# on this disk, the install itself needs far less).
MIN_FREE_GIB ?= 7
define DISK_CHECK
import os, shutil, sys
free = shutil.disk_usage(".").free / 2**30
if free < float(sys.argv[1]):
    print(f"make setup: WARNING only {free:.1f} GiB free on the disk of {os.getcwd()} (less than "
          f"MIN_FREE_GIB={sys.argv[1]}); a fresh environment takes about 7 GiB (torch with its CUDA "
          "libraries). If the install stops with 'No space left on device', free some space and run "
          "make again.", file=sys.stderr)
endef
export DISK_CHECK
# $(call install,EXTRAS): install the package with those extras into .venv
install = ($(PY) -m pip install -q uv && $(PY) -c "$$PIP_PLAN" "$(1)" > $(VENV)/install-plan.txt \
	&& $(VENV)/bin/uv pip install --python $(PY) --no-deps --compile-bytecode -r $(VENV)/install-plan.txt \
	&& $(VENV)/bin/uv pip install --python $(PY) --no-deps -e .) \
	|| (echo "uv failed or is unavailable: installing with pip" && $(PY) -m pip install -e ".[$(1)]")

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "$$DISK_CHECK" "$(MIN_FREE_GIB)"
	$(call install,dev)
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the package with its dev extras

demo: setup  ## generate the embedded corpus and run the full pipeline into outputs/demo/
	$(PY) -m xai_lib.pipeline --demo

test: setup  ## unit, integration and smoke tests (no browser), one worker per core (at most 4), files kept together, the longest files first (tests/conftest.py)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

corpus: setup  ## only (re)generate the demo corpus
	$(PY) -m xai_lib.data.synthetic --out outputs/data/demo_corpus --size demo --seed 0

test-e2e: setup  ## browser end-to-end test: notebook 03's viewer in JupyterLab + headless Chromium (installs chromium via apt)
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium chromium-driver)
	@$(PY) -c "import playwright.sync_api" 2>/dev/null || $(call install,dev$(COMMA)e2e)
	XAI_E2E_REQUIRED=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -o addopts="" -m e2e -q -rs tests/e2e

lab: setup  ## open JupyterLab on the notebooks (the viewer lives in notebook 03)
	$(VENV)/bin/jupyter lab notebooks/

bench: setup  ## explanation cost/quality and throughput benchmarks -> outputs/bench/
	$(PY) -m xai_lib.bench

notebooks: setup  ## rebuild notebooks/*.ipynb from their reviewed jupytext scripts (notebooks/*.py), without outputs
	cd notebooks && for s in 0*.py; do ../$(VENV)/bin/jupytext --to ipynb "$$s" -o "$${s%.py}.ipynb"; done

clean:
	rm -rf $(VENV) .pytest_cache

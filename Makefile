# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
COMMA  := ,

.PHONY: setup demo test test-e2e lab bench corpus notebooks clean

# Installs go through uv (parallel unpacking and bytecode compilation: 71 s vs pip's 175 s for
# ".[dev]" on a 2-core machine, about 4.5 GB of torch/CUDA wheels) with the indexes, find-links and
# constraints of this machine's pip configuration; where uv cannot be had or fails, plain pip does it.
define PIP_TO_UV
import shlex, subprocess, sys
flags = {"find-links": "--find-links", "index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "constraint": "--constraint"}
args = []
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
for line in out.splitlines():  # key='value', e.g. global.extra-index-url='URL URL' or :env:.find-links='DIR'
    key, sep, value = line.partition("=")
    flag = flags.get(key.rsplit(".", 1)[-1])
    for v in (shlex.split(value) or [""])[0].split() if sep and flag else []:
        if (flag, v) not in args:
            args.append((flag, v))
print(shlex.join(a for pair in args for a in pair))
endef
export PIP_TO_UV
# $(call install,EXTRAS): install the package with those extras into .venv
install = ($(PY) -m pip install -q uv && $(VENV)/bin/uv pip install --python $(PY) --index-strategy unsafe-best-match \
	--compile-bytecode $$($(PY) -c "$$PIP_TO_UV") -e ".[$(1)]") \
	|| (echo "uv failed or is unavailable: installing with pip" && $(PY) -m pip install -e ".[$(1)]")

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
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

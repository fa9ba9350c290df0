# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench reproduce gpu-check

# make reproduce [SEEDS=3] [SCALE=paper]: every headline claim's preset, then reports/reproduce/index.html
SEEDS ?= 1
SCALE ?= cpu

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) vision/vision_transfer.py configs/fcn.yaml

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

# On a CUDA machine: every bench and a short paper-shaped run of each system, ratios in gpu-check.json
# (bench/gpu_check.py; `$(PY) bench/gpu_check.py --quick` is its CPU mode, which the tests run).
gpu-check: $(STAMP)
	PYTHONPATH=. $(PY) bench/gpu_check.py --out gpu-check.json

reproduce: $(STAMP)
	$(PY) -m instill.reproduce --seeds $(SEEDS) --scale $(SCALE) --executor $(if $(filter paper,$(SCALE)),auto,local)

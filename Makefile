# Two commands on a fresh machine: `make demo` (set up + run the demo), `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
# constraints.txt pins torch to the CPU build on this machine's disk (no multi-GB CUDA download).
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test setup-demo setup-test bench mirror

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

setup-demo: $(VENV)/bin/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[demo]"

setup-test: $(VENV)/bin/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[test]"

demo: setup-demo
	$(VENV)/bin/lightning-ties demo

test: setup-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --timeout=900 tests lightning_ties --doctest-modules

# The pytorch_lightning layer is generated from the unified one (lightning_ties/pytorch/): run after editing it.
mirror:
	$(PYTHON) tools/mirror.py

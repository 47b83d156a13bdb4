# The two commands of the README. Both create .venv (torch 2.14.1, this package with its compiled
# extension, test dependencies) if needed, rebuild the extension incrementally, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script.
export CUDA_HOME ?= /usr/local/cuda

.PHONY: setup demo test bench

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 setuptools wheel ninja pybind11
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/installed
	$(PY) setup.py --quiet build_ext --inplace

demo: setup
	$(PY) benchmarks/bench_bit_sharing.py

bench: setup
	$(PY) benchmarks/bench_bit_sharing.py

test: setup
	$(PY) -m pytest

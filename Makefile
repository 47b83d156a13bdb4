# The two commands of the README. Both create .venv (torch 2.14.1, this package with its compiled
# extension, test dependencies) when needed, reinstall when the package or its C++/CUDA sources
# changed, then run. (While editing kernels, `.venv/bin/python setup.py build_ext --inplace`
# rebuilds incrementally.)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script.
export CUDA_HOME ?= /usr/local/cuda

.PHONY: setup demo test bench

SOURCES := pyproject.toml setup.py $(shell find csrc -type f)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 setuptools wheel ninja pybind11

$(VENV)/installed: $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/installed

demo: setup
	$(PY) -m mixedprec demo

bench: setup
	$(PY) -m mixedprec bench

test: setup
	$(PY) -m pytest
	$(PY) tests/mutants/run.py

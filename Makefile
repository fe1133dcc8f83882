# Two commands do all the set-up from a clean clone (Linux, Python 3.11):
#   make run    -> the main job: `crossent run` on its bundled default data
#   make test   -> the whole test suite, the docstring examples and mypy (what CI runs, with `make docs`)
# and, for the release and the documentation:
#   make docs       -> the documentation site in docs/_build/html (Sphinx, warnings are errors)
#   make typecheck  -> mypy on src/ (configuration in pyproject.toml)
#   make dist       -> sdist + wheel in dist/
#   make wheel-smoke -> dist, installed in a fresh venv with the core dependencies only, smoke-tested
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run quick test suite doctest typecheck docs dist wheel-smoke lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, by exact pin: where a CPU wheel is at hand (this CI machine's pip find-links)
	# it is the CPU build; an unpinned torch from PyPI on Linux is the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# [dev] holds every extra ([all]: plot, cli, run, hf, gpu) and the test, docs and build tools
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/crossent run

quick: $(VENV)/.installed
	$(VENV)/bin/crossent run --quick

test: $(VENV)/.installed
	# the docstring examples and mypy (one process each) beside the suite (two workers): each
	# target's output comes whole when it ends
	$(MAKE) -j3 --output-sync doctest typecheck suite

suite: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

doctest: $(VENV)/.installed
	$(PY) -m pytest -q -p no:xdist --doctest-modules src/crossent

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

docs: $(VENV)/.installed
	$(VENV)/bin/sphinx-build -b html -W --keep-going -q docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

dist: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --outdir dist .

wheel-smoke: $(VENV)/.installed
	PY=$(PY) PYTHON=$(PYTHON) .ci/wheel_smoke.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples docs .ci conftest.py

bench: $(VENV)/.installed
	$(VENV)/bin/crossent bench

clean:
	rm -rf $(VENV) runs dist docs/_build

# Two commands do all the set-up from a clean clone (Linux, Python 3.11):
#   make run    -> the main job: `crossent run` on its bundled default data
#   make test   -> the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run quick test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first, by exact pin: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[run,dev]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/crossent run

quick: $(VENV)/.installed
	$(VENV)/bin/crossent run --quick

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples

bench: $(VENV)/.installed
	$(VENV)/bin/crossent bench

clean:
	rm -rf $(VENV) runs

# The README's commands. Each one creates the virtual environment and installs the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-quick lint bench bench-lifelong venv clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/python -m pip install --quiet -e ".[test,pq,report]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/seminar-tf demo --work-dir $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every test except the end-to-end ones marked `slow` (training runs, exports, benches, subprocess CLIs).
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff (pyflakes + pycodestyle, line width 120; ruff.toml); CI runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/seminar-tf bench all --out benchmarks

# The lifelong claim (hours on 2 cores): SEMINAR at L=10^2..10^4 and the baselines against the world's oracle.
bench-lifelong: $(STAMP)
	$(BIN)/seminar-tf bench lifelong --out benchmarks --resume

clean:
	rm -rf $(VENV) runs build *.egg-info

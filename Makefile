# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo recycle clean

# libtpu (the `aot` extra's pin) goes to .venv/libtpu, off sys.path: parscale_jax.aot loads it to
# compile for TPU topologies on this host; nothing else sees it.
LIBTPU = $(shell grep -o '"libtpu==[^"]*"' pyproject.toml | tr -d '"')
# The CUDA compile-only packages (the `aot-gpu` extra's pins) go to .venv/cuda, off sys.path the
# same way: parscale_jax.aot puts them on the path of its child process for GPU topologies only.
CUDA_AOT = $(shell sed -n '/^aot-gpu = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*=="[^"]*"\|"[^"]*==[^"]*"' | tr -d '"')

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/libtpu "$(LIBTPU)"
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/cuda $(CUDA_AOT)
	touch $(STAMP)

setup: $(STAMP)

# Two workers, one test module each at a time (module fixtures compile once): 2 cores kept busy.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile

test: setup
	$(PYTEST) tests

# The quick loop (< 2 min on 2 cores): everything but the tests marked slow (training runs, subprocesses).
test-fast: setup
	$(PYTEST) tests -m "not slow"

# Train tiny at P=1 and P=4 on the default corpus, evaluate both, print a table (< 10 min on 2 cores).
demo: setup
	$(BIN)/python scripts/demo.py --out runs/demo

# The two-stage recipe (issue 6): stage 1 at P=1, then P=1 continued vs P=4 full vs P=2/4 frozen.
recycle: setup
	$(BIN)/python scripts/recycle.py --out runs/recycle

clean:
	rm -rf $(VENV) runs

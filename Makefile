# The two commands a newcomer runs: `make demo` and `make test`.
# Each creates .venv when missing (torch 2.13.0 first, so nothing pulls a CUDA build),
# installs the project with its test and cluster (Ray) extras and bpy, then does its job.
# Re-running is quick: the install is redone only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
BPY    := bpy>=4.2,<5.1
DEMO_OUT ?= out/demo

.PHONY: demo test test-all bench venv extension clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,cluster]"
	$(PY) -m pip install --quiet "$(BPY)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m distill3d generate "a rubber duck" --prior reference --method esd-exact --lam 1 --view-dependent --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

bench: $(STAMP)
	$(PY) -m distill3d bench --quick --out out/bench

extension: $(STAMP)
	$(PY) scripts/build_extension.py --out dist

clean:
	rm -rf $(VENV) out dist .pytest_cache

# Everything a fresh machine needs, then the checks CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
EXTRAS ?= coordinator,worker,gpu,extract,export,s3,knn,dev
# torch first, pinned, so that the gpu extra does not pull a CUDA build from PyPI: on these
# machines pip takes both wheels from the local disk (see README "Post-processing").
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint pytest demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

lint: setup
	$(BIN)/ruff check --no-cache .
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: setup
	$(BIN)/pytest

test: lint pytest

demo: setup
	$(BIN)/pairfarm demo

# Everything a fresh machine needs, then the checks CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
EXTRAS ?= coordinator,worker,gpu,extract,export,s3,knn,search,dev
# torch first, pinned, so that the gpu extra does not pull a CUDA build from PyPI: on these
# machines pip takes both wheels from the local disk (see docs/postprocess.md).
TORCH ?= torch==2.14.1 torchvision==0.29.1

# The readers' venv: TFDS's laion400m builder, embedding-reader and webdataset read
# `pairfarm export` output in tests/test_export_readers.py (skipped without it). Built
# once, kept while its marker exists; TensorFlow is never a dependency of pairfarm.
READERS ?= .venv-tf
READER_PACKAGES ?= tensorflow-cpu==2.21.0 tensorflow-datasets==4.9.10 \
	importlib_resources==7.1.0 embedding-reader==1.8.1 webdataset==1.0.2 pillow pandas pyarrow

.PHONY: setup test lint pytest demo readers

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

readers: $(READERS)/.installed

$(READERS)/.installed:
	python3 -m venv $(READERS)
	$(READERS)/bin/python -m pip install -q -U pip
	$(READERS)/bin/python -m pip install -q $(READER_PACKAGES)
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

# The two commands a newcomer runs (see README.md):
#   make study   set up the virtual environment and run the main job
#   make test    set up the virtual environment and run the tests
#   make docs    build the documentation site into site/ (MkDocs, mkdocs.yml)
# torch 2.13.0 (CPU build) is installed first, so that no other requirement lets pip
# choose a newer torch and pull a CUDA build of several GB.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.normlab-installed
# (the Material theme's notice about MkDocs 2 is not a warning of this build)
MKDOCS := NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs

.PHONY: setup study test test-slow test-interop lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[lab,test,export,cluster,docs]'
	touch $(STAMP)

study: $(STAMP)
	$(VENV)/bin/normlab study

test: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m pytest
	$(MKDOCS) build --strict --quiet

# torch.compile / torch.export / ONNX tests of every layer (marked slow, a few minutes;
# the fused C++ kernels' tests run in `make test`)
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Real timm and torchvision models with normlab's layers and tools (tests marked
# interop, not part of `make test`): their own virtual environment, since torchvision
# 0.29.1 needs torch 2.14.1, whose PyPI build brings CUDA libraries (about 5.5 GB and
# several minutes to install). The last test runs two gloo processes.
INTEROP_VENV  ?= .venv-interop
INTEROP_PY    := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.normlab-installed

$(INTEROP_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_PY) -m pip install --quiet --upgrade pip
	$(INTEROP_PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 timm==1.0.31
	$(INTEROP_PY) -m pip install --quiet -e '.[test]'
	touch $(INTEROP_STAMP)

test-interop: $(INTEROP_STAMP)
	$(INTEROP_PY) -m pytest -m interop tests/project/test_interop_real.py

lint: $(STAMP)
	$(PY) -m ruff check src tests

# The documentation site: the pages of docs/ and the API reference from the docstrings.
docs: $(STAMP)
	$(MKDOCS) build --strict

clean:
	rm -rf $(VENV) $(INTEROP_VENV) build site *.egg-info src/*.egg-info .pytest_cache .ruff_cache .hypothesis

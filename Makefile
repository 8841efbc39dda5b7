# st-moe: the two commands of the README.
#   make test   set up .venv from requirements.lock (if missing or stale), install the project, run pytest
#   make demo   same set-up, then the project's main job on the embedded default (CPU)
# Everything is installed from the package registries; nothing else is needed but a Python 3.11.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON_VERSION := 3.11

# The interpreter the venv is made from: python3.11, or python3 when that is 3.11.
PYTHON ?= $(shell for p in python3.11 python3; do \
            if command -v $$p >/dev/null 2>&1 && [ "$$($$p -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$(PYTHON_VERSION)" ]; then \
              command -v $$p; break; fi; done)

.PHONY: test demo venv check-python clean

check-python:
	@if [ -z "$(PYTHON)" ]; then \
	  echo "error: st-moe needs Python $(PYTHON_VERSION) (as python3.11, or python3 being 3.11)." >&2; \
	  echo "       tensorflow 2.12.1 is the newest TensorFlow that mesh-tensorflow 0.1.21 and t5's" >&2; \
	  echo "       TPUEstimator-based t5_mesh_transformer run on, and its newest Python is 3.11." >&2; \
	  exit 2; fi

# The venv is rebuilt from scratch when requirements.lock changes, and the project re-installed
# (editable: the package maps tasks/ to st_moe.tasks) when setup.py changes.
# pip byte-compiles what it installs one file at a time; compileall writes the same .pyc files on
# every core (2 cores: install 1.8 + compile 1.2 min instead of 3.7 min). Python 2 files some
# packages ship do not compile, under pip as here: compileall's listing and status are not read.
$(VENV)/.lock-installed: requirements.lock | check-python
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-compile -r requirements.lock 2>&1 \
	  | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null 2>&1 || true
	touch $@

$(VENV)/.project-installed: $(VENV)/.lock-installed setup.py pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: check-python $(VENV)/.project-installed

test: venv
	$(VENV)/bin/pytest

demo: venv
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info

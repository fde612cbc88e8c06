# lmtrain — `make train` and `make test` set everything up on a fresh machine.
TORCH ?= 2.13.0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# On a GPU, the fastest measured options for the same recipe (docs/speed.md).
GPU_FAST := fast=compiled fast.loss=fused
# Offline machines: point the downloads at a local mirror (tests and CI use ../shared/data).
export LMTRAIN_DATA_MIRROR ?= $(wildcard $(abspath ../shared/data))

.PHONY: install train test bench tensorboard lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==$(TORCH)"
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The lesson's build-along on a CUDA GPU; a CPU preset (under 5 minutes on 2 cores) elsewhere.
train: install
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "make train: CUDA found -> experiment=seed $(GPU_FAST) (the lesson's build-along: GPT-2 BPE, 10M model, bf16)"; \
		$(PY) -m lmtrain.train experiment=seed $(GPU_FAST) $(ARGS); \
	else \
		echo "make train: no CUDA -> experiment=cpu (character model, under 5 minutes on 2 cores)"; \
		$(PY) -m lmtrain.train experiment=cpu $(ARGS); \
	fi

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

# Our training speed for the recipe `make train` runs; add --raw in ARGS for the plain loop.
bench: install
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m lmtrain.bench train experiment=seed $(GPU_FAST) $(ARGS); \
	else \
		$(PY) -m lmtrain.bench train experiment=cpu $(ARGS); \
	fi

tensorboard: install
	$(PY) -m tensorboard.main --logdir outputs --bind_all

lint: install
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) outputs

# dynmoe_dist: one entry point for set-up, tests, benchmarks and training.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -c constraints.txt
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= 2

.PHONY: venv test lint unit bench train clean

venv: $(STAMP)

# torch first (the CPU build), then DeepSpeed without build isolation (it imports torch at build time, and its
# one CPU op is prebuilt), then everything else; each pinned by constraints.txt. Re-runs only when these change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch
	DS_BUILD_SHM_COMM=1 $(PIP) --no-cache-dir --no-build-isolation deepspeed
	$(PIP) -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check dynmoe_dist tests
	$(PY) -m ruff format --check dynmoe_dist tests

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m dynmoe_dist.bench layer --json bench/layer.json
	$(PY) -m dynmoe_dist.bench expert_parallel --json bench/expert_parallel.json
	$(PY) -m dynmoe_dist.bench adapt --json bench/adapt.json
	$(PY) -m dynmoe_dist.bench train --json bench/train.json
	$(PY) -m dynmoe_dist.bench checkpoint --json bench/checkpoint.json

# The demo run: 2 CPU ranks (one per GPU where there are GPUs) through launch/torchrun.sh, then the report.
# RUN names the run folder (runs/$(RUN)); ARGS takes hydra overrides, e.g. make train ARGS="moe=top_k steps=100".
RUN ?= demo
ARGS ?=
train: $(STAMP)
	OMP_NUM_THREADS=1 PYTHON=$(PY) launch/torchrun.sh name=$(RUN) $(ARGS)
	$(PY) -m dynmoe_dist.train.report runs/$(RUN)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

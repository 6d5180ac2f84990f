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

train:
	@echo "make train arrives with the training application (train/): see README.md" && exit 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# dynmoe_dist: one entry point for set-up, tests, benchmarks and training.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --no-compile -c constraints.txt
# Byte code: what every process imports (torch, the sympy of its compiler, DeepSpeed, numpy, hydra) is compiled once
# after the installs, on every core; every other module is compiled by the first process that imports it, and kept,
# even where PYTHONDONTWRITEBYTECODE is set (CI machines set it: then every test process compiled torch and DeepSpeed
# again, and the suite took twice as long). Compiling the whole venv (14,000 modules) up front took 40 s; this set, 17.
unexport PYTHONDONTWRITEBYTECODE
PRECOMPILED := torch sympy deepspeed numpy hydra omegaconf antlr4 safetensors
PURELIB = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Tutel is not on the package index: a wheel built from its repository at the pinned commit, where one is provided.
WHEELS ?= ../shared/wheels
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= 2

.PHONY: venv test lint unit bench quality train clean

venv: $(STAMP)

# torch first (the CPU build), then DeepSpeed without build isolation (it imports torch at build time, and its
# one CPU op is prebuilt, with ninja on every core: half the time of its default serial build, about a minute less),
# then everything else; each pinned by constraints.txt. Re-runs only when these change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch ninja
	PATH="$(abspath $(VENV))/bin:$$PATH" DS_BUILD_SHM_COMM=1 DS_ENABLE_NINJA=1 \
		$(PIP) --no-cache-dir --no-build-isolation deepspeed
	$(PIP) -e ".[dev]"
	if ls $(WHEELS)/tutel-*.whl >/dev/null 2>&1; then $(PIP) --no-deps --no-index --find-links $(WHEELS) tutel; \
	else echo "no Tutel wheel in $(WHEELS): the Tutel tests and benchmark columns will be skipped"; fi
	cd "$(PURELIB)" && $(abspath $(PY)) -m compileall -q -j 0 $(PRECOMPILED) >/dev/null || true
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check dynmoe_dist benchmarks tests
	$(PY) -m ruff format --check dynmoe_dist benchmarks tests

test: lint
	$(PY) -m pytest -q

# Every benchmark (the benchmarks/ package at the repository root, not installed with the wheel), each writing its JSON
# document to benchmarks/results/ (about 40 minutes on 2 cores), then the README's results table regenerated from
# those documents (`benchmarks report`; the test suite checks the two agree, so commit both). The second
# `benchmarks train` runs the three variants the end-to-end targets compare, over 8 rounds: a 95% interval per ratio,
# for this job's rounds (repeat the job before trusting a close verdict: the machine's state moves the ratio between
# jobs).
RESULTS := benchmarks/results
bench: $(STAMP)
	$(PY) -m benchmarks layer --json $(RESULTS)/layer.json
	$(PY) -m benchmarks layer --sweep --gemm loop --json $(RESULTS)/layer_sweep.json
	$(PY) -m benchmarks layer --sweep --json $(RESULTS)/layer_sweep_onednn.json
	$(PY) -m benchmarks row_ops --json $(RESULTS)/row_ops.json
	$(PY) -m benchmarks cpu_gemm --json $(RESULTS)/cpu_gemm.json
	$(PY) -m benchmarks expert_parallel --json $(RESULTS)/expert_parallel.json
	$(PY) -m benchmarks expert_parallel --sweep --json $(RESULTS)/expert_parallel_sweep.json
	$(PY) -m benchmarks adapt --json $(RESULTS)/adapt.json
	$(PY) -m benchmarks train --json $(RESULTS)/train.json
	$(PY) -m benchmarks train --variants ours_top2,deepspeed_dropless,deepspeed_cf1 --rounds 8 --json $(RESULTS)/train_targets.json
	$(PY) -m benchmarks checkpoint --json $(RESULTS)/checkpoint.json
	$(PY) -m benchmarks hf --json $(RESULTS)/hf.json
	$(PY) -m benchmarks report --write README.md

# What each gate buys in model quality (hours: 12 variants x 2 seeds x 300 and 1000 steps, 2 ranks each). Every run is
# cached in benchmarks/quality_runs/ and resumes where it stopped: run it again after an interruption.
# QUALITY_ARGS: e.g. --variants top2,top_any_demo --steps 300, or --data FOLDER --tag NAME for another corpus.
QUALITY_ARGS ?=
quality: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks quality $(QUALITY_ARGS)

# The demo run: 2 CPU ranks, or one rank per GPU where there are GPUs, then the report.
#   make train                                   # torchrun, the demo config
#   make train NPROC=4 LAUNCHER=deepspeed moe=top_k steps=100    # any hydra override as a make argument
# LAUNCHER: torchrun (default) | deepspeed | mpirun (MPICH or Open MPI); NPROC: ranks on this host (default: every GPU,
# or 2 without GPUs); RUN: the run name (folder runs/$(RUN)). Other NAME=VALUE arguments are hydra overrides.
RUN ?= demo
NPROC ?=
LAUNCHER ?= torchrun
ARGS ?=
OWN_VARS := NPROC=% LAUNCHER=% RUN=% ARGS=% PYTHON=% VENV=%
OVERRIDES = $(filter-out $(OWN_VARS),$(MAKEOVERRIDES)) $(ARGS)
LAUNCH_torchrun = NPROC_PER_NODE=$(NPROC) PYTHON=$(PY) launch/torchrun.sh
LAUNCH_deepspeed = NPROC_PER_NODE=$(NPROC) DEEPSPEED=$(VENV)/bin/deepspeed launch/deepspeed.sh
LAUNCH_mpirun = NP=$(or $(NPROC),2) MPIRUN=$(or $(shell command -v mpirun 2>/dev/null),$(VENV)/bin/mpiexec) PYTHON=$(PY) launch/mpirun.sh
train: $(STAMP)
	@test -n "$(LAUNCH_$(LAUNCHER))" || { echo "make train: LAUNCHER=$(LAUNCHER): expected torchrun, deepspeed or mpirun" >&2; exit 2; }
	OMP_NUM_THREADS=1 PATH="$(abspath $(VENV))/bin:$$PATH" $(LAUNCH_$(LAUNCHER)) name=$(RUN) $(OVERRIDES)
	$(PY) -m dynmoe_dist.train.report runs/$(RUN)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# fac: the two commands of the README, and the set-up they share.
#   make reproduce   set up, then run the whole DAG on params/default.yaml (the embedded tiny world)
#   make test        set up, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fac-installed
PROFILE ?= workflow/profiles/local
ARGS ?=
export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup system browser reproduce ablations data test lint slurm clean-results

setup: system $(STAMP)

# System tools: espeak-ng (speech synthesis), sox, g++ (DeepSpeed's first start compiles a small op).
system:
	@missing=""; for t in espeak-ng sox g++; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system tools:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng sox g++; \
	fi

# Headless Chromium and its driver, for the tests that look at a page in a browser (tests/browser.py: the demo page,
# the report's images). Debian's, at the paths the tests give selenium, so that Selenium Manager downloads nothing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing chromium and chromium-driver"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

# The virtual environment, rebuilt when the pins change. torch/torchaudio first: DeepSpeed's setup
# imports torch, and DS_BUILD_OPS=0 installs it without CUDA.
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (fac needs Python 3.11; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.11.0 torchaudio==2.11.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Restore the DVC-versioned source data (data/) when a fresh clone lacks it.
data/world/lexicon.yaml: data.dvc | $(STAMP)
	$(BIN)/dvc pull -q data.dvc || $(BIN)/dvc checkout data.dvc

reproduce: setup data/world/lexicon.yaml
	$(BIN)/snakemake --profile $(PROFILE) $(ARGS)

# Every ablation in one command: the recipe with its merge-alpha and DPO-per-dimension ablations, the whole
# recipe once per grouping k (experiments k1, k4, k6 beside default's k = 5), then the recipe's report again
# so that its grouping-k table has them all.
GROUPING_K ?= 1 4 6
ablations: setup data/world/lexicon.yaml
	$(BIN)/snakemake --profile $(PROFILE) --configfile params/default.yaml params/overlays/ablations.yaml $(ARGS)
	for k in $(GROUPING_K); do \
	  $(BIN)/snakemake --profile $(PROFILE) --configfile params/default.yaml params/overlays/k$$k.yaml $(ARGS) || exit 1; \
	done
	$(BIN)/snakemake --profile $(PROFILE) --configfile params/default.yaml params/overlays/ablations.yaml --forcerun report $(ARGS)

data: setup data/world/lexicon.yaml
	$(BIN)/snakemake --profile $(PROFILE) data $(ARGS)

# Two pytest-xdist workers (most of a test's time is a job's start-up, one core's work); tests that share a built
# experiment run on one worker, the heaviest first (tests/conftest.py). TEST_WORKERS=0 runs them in one process.
# The 25 slowest tests are listed at the end (where the time goes).
TEST_WORKERS ?= 2
test: setup browser data/world/lexicon.yaml
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25 $(ARGS)

# A one-node SLURM cluster on this machine (root: installs Debian's slurm and mariadb packages) to try the slurm
# profile; tests/test_slurm.py starts it itself.
slurm:
	workflow/cluster/local-slurm.sh up

lint: setup
	$(BIN)/snakemake --lint

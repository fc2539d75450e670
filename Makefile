# cifarlab — every target installs what it needs on a fresh machine (uv, then the locked environment).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif
PY := .venv/bin/python
ARGS ?=

.PHONY: help install train test test-fast lint format bench wandb-sync dashboard clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.venv/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode  # .pyc up front: every process starts faster
	@touch $@

install: .venv/.synced  ## create .venv from uv.lock (installs uv with pip if missing)

train: install  ## train: make train ARGS="optimizer=rmsprop data=synthetic trainer.max_epochs=2"
	$(PY) train.py $(ARGS)

test: install  ## the whole suite, as CI runs it (fast tier + slow end-to-end tests)
	$(PY) -m pytest -n 2 --durations=15 $(ARGS)

test-fast: install  ## the fast tier only
	$(PY) -m pytest -n 2 -m "not slow" $(ARGS)

lint: install  ## ruff
	$(PY) -m ruff check src tests bench train.py eval.py
	$(PY) -m ruff format --check src tests bench train.py eval.py

format: install
	$(PY) -m ruff format src tests bench train.py eval.py
	$(PY) -m ruff check --fix src tests bench train.py eval.py

bench: install  ## side-by-side speed benchmark (writes bench/results/*.json)
	$(PY) -m cifarlab.bench $(ARGS)

wandb-sync: install  ## upload offline W&B runs: make wandb-sync [ARGS=runs/...]
	$(PY) -m cifarlab.wandb_sync $(ARGS)

dashboard:  ## optuna-dashboard: make dashboard [ARGS=multirun/<study>/journal.log or a database URL] (default: the newest sweep's journal)
	@storage="$(ARGS)"; \
	if [ -z "$$storage" ]; then storage=$$(ls -t multirun/*/journal.log multirun/*/*/journal.log 2>/dev/null | head -n 1); fi; \
	if [ -z "$$storage" ]; then echo "make dashboard: no multirun/*/journal.log yet; run a sweep first or give ARGS=<journal file or database URL>" >&2; exit 1; fi; \
	echo "optuna-dashboard $$storage"; \
	$(UV) run --frozen --extra dashboard optuna-dashboard $$storage

clean:  ## remove caches and outputs (keeps data/ and .venv)
	rm -rf runs outputs .pytest_cache .ruff_cache bench/results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# `make run` starts payonce locally; `make test` runs its test suite. Both bring up PostgreSQL,
# Redis and RabbitMQ first (ops/services.sh) and keep the Python environment in .venv.
SHELL := /bin/sh
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PIP := $(VENV)/bin/pip --disable-pip-version-check
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv services tools run test lint bench soak stop-services clean

help:
	@echo 'make run            services + edge (:8080) and processor in the foreground (Ctrl-C stops)'
	@echo 'make test           services + pytest (PYTEST_ARGS="-k name -x" to narrow)'
	@echo 'make lint           ruff and mypy'
	@echo 'make bench          load figures (BENCH_ARGS="-n 2000 -c 50 --psp-latency 100-400")'
	@echo 'make soak           30 minutes at a fixed rate: RSS and accept p99 per minute (SOAK_ARGS="--rate 100 --minutes 30")'
	@echo 'make venv           create/update .venv from requirements.lock'
	@echo 'make services       make sure PostgreSQL, Redis and RabbitMQ answer (ops/services.sh)'
	@echo 'make stop-services  stop only the servers ops/services.sh started (.data/, docker)'
	@echo 'make clean          remove .venv and build output (keeps .data/)'

venv: $(STAMP)

# Rebuilt only when the lock or the package metadata change.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "venv: Python >= 3.11 is required; $(PYTHON) is: $$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 || echo 'not found')"; \
	  echo "venv: install one, or name it: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo 'venv: python3-venv is missing; installing it'; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv || exit 1; \
	  else \
	    echo "venv: $(PYTHON) -m venv needs the python3-venv package; run:"; \
	    echo '  sudo apt-get update && sudo apt-get install -y python3-venv'; exit 1; \
	  fi; }
	@[ -x $(VENV)/bin/pip ] || { echo 'venv: creating $(VENV)'; $(PYTHON) -m venv $(VENV); }
	@echo 'venv: installing requirements.lock and payonce (editable)'
	@$(PIP) install -q -r requirements.lock
	@$(PIP) install -q --no-deps -e .
	@touch $@

services:
	@bash ops/services.sh

run: venv services
	exec $(VENV)/bin/payonce dev

test: venv services tools
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Prometheus' promtool checks the alert rules, and its server scrapes a real stack in a test;
# headless Chromium loads the API reference page.
tools:
	@bash ops/services.sh tools prometheus chromium

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy

bench: venv services
	$(VENV)/bin/python -m ops.bench $(BENCH_ARGS)

soak: venv services
	$(VENV)/bin/python -m ops.soak $(SOAK_ARGS)

stop-services:
	@bash ops/services.sh stop

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -path ./.data -prune -o -path ./.git -prune -o -name __pycache__ -type d -exec rm -rf {} +

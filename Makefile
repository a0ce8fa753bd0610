# Two commands on a fresh machine: `make demo` (install, then run the offline demo study) and `make test`.
# Both create .venv when it is missing and install into it once; later runs reuse it.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
INSTALLED := $(VENV)/.medtransfer-installed
PYTEST_ARGS ?=
# The suite runs its test files in parallel (pytest-xdist), one worker per core up to 4: most of its time is spent
# starting and waiting on subprocesses (dvc, mlflow, workers), which leaves cores idle in a serial run. A test
# file stays on one worker, so its module fixtures (a study, a server) are built once. PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

# Offline by design: no analytics, no hub look-ups, no telemetry.
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(BIN):$(PATH)

.PHONY: install demo test benchmarks clean

install: $(INSTALLED)

# pip's index configuration on some machines names local folders that do not exist; drop those warnings only.
$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing medtransfer and its dependencies into $(VENV) (first time only; several minutes)"
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -e '.[test]' 2>&1 \
		| { grep -v "^WARNING: Location '.*' is ignored" || true; }
	@touch $@

demo: $(INSTALLED)
	$(BIN)/medtransfer study
	@echo "demo: open the report at reports/report.md; browse the runs with: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

test: $(INSTALLED)
	$(BIN)/python -m pytest -rs --durations=25 -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

benchmarks: $(INSTALLED)
	$(BIN)/python benchmarks/similarity.py

clean:
	rm -rf data/raw/demo data/prepared/*/ mlflow.db mlartifacts optuna.db optuna.log results activations reports dvc_plots dvc.lock .dvc/cache .medtransfer-locks .pytest_cache

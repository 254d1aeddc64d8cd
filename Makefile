# One entry point for every task. `make test` and `make run` set themselves up on a fresh machine.
SHELL := /bin/bash
PY_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install proto proto-check proto-lint proto-breaking proto-baseline contract buf-path test test-fast lint typecheck run demo migrate bench clean

help:
	@echo "make run        start Postgres, S3, migrations, job-service and two workers (foreground)"
	@echo "make demo       upload a generated video through the running stack and follow it to done"
	@echo "make test       install everything, check stubs and layering, run the whole suite"
	@echo "make proto      regenerate the gRPC stubs from protos/"
	@echo "make contract   stubs current, buf lint, buf breaking against protos/baseline (in make test)"
	@echo "make proto-baseline  refresh the released-contract image (at a release only)"
	@echo "make lint       ruff + import-linter;  make typecheck: mypy"
	@echo "make migrate    alembic upgrade head against JOB_SERVICE_DATABASE_URL"
	@echo "make bench      lease-path benchmark beside same-run baselines (raw SQL, PgQueuer, echo); BENCH_ARGS=--quick"
	@echo "make chaos      the chaos suite at full scale (faults across the fleet, ~10 min)"
	@echo "make compose-up     the stack in Docker (builds, waits until healthy, prints the tokens)"
	@echo "make compose-down   stop it (data kept in volumes);  make compose-test: the compose test"
	@echo "make bench-analysis  deep pass vs decode-only, PySceneDetect and ffmpeg on generated clips; BENCH_ARGS=--quick"

$(STAMP): pyproject.toml
	@command -v $(PY_BOOT) >/dev/null || { echo "need $(PY_BOOT) on PATH"; exit 1; }
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[service,worker,bench,analysis-bench,dev]'
	@bash scripts/ensure_system_deps.sh
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	PY=$(PY) bash scripts/gen_protos.sh

# Fails when the committed stubs differ from what the protos generate.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d); PY=$(PY) bash scripts/gen_protos.sh "$$tmp"; \
	if diff -r -q -x __pycache__ protos/gen/python/jobs "$$tmp/jobs" >/dev/null; then echo "proto stubs: up to date"; rm -rf "$$tmp"; \
	else echo "proto stubs are stale: run 'make proto' and commit"; diff -r -x __pycache__ protos/gen/python/jobs "$$tmp/jobs" | head -20; rm -rf "$$tmp"; exit 1; fi

# The contract family: `proto` regenerates the stubs; `contract` checks the public contract
# three ways: the committed stubs are current (proto-check), buf's style rules (proto-lint), and
# nothing breaks old callers against the last released contract (proto-breaking, against the
# committed image $(PROTO_BASELINE)). Rules and their reasons: protos/buf.yaml.
# `make proto-baseline` refreshes the image deliberately, at a release, and nowhere else.
# buf is pinned and comes from the npm registry (linux-x64 binary) into .tools/, once.
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/buf-$(BUF_VERSION)/node_modules/.bin/buf
PROTO_BASELINE := protos/baseline/jobs.v1.binpb

$(BUF):
	@command -v npm >/dev/null || { echo "need npm on PATH: buf comes from the npm registry"; exit 1; }
	npm install --prefix $(TOOLS)/buf-$(BUF_VERSION) --no-save --no-audit --no-fund \
	  --ignore-scripts --loglevel=error @bufbuild/buf@$(BUF_VERSION)
	@$(BUF) --version >/dev/null

# Prints buf's absolute path (installing it first): tests/contract asks here.
buf-path: $(BUF)
	@echo $(abspath $(BUF))

proto-lint: $(BUF)
	$(BUF) lint protos
	@echo "buf lint: clean"

proto-breaking: $(BUF)
	$(BUF) breaking protos --against $(PROTO_BASELINE)
	@echo "buf breaking: nothing breaks $(PROTO_BASELINE)"

proto-baseline: $(BUF)
	$(BUF) build protos --exclude-source-info -o $(PROTO_BASELINE)
	@echo "wrote $(PROTO_BASELINE): commit it with the release"

contract: proto-check proto-lint proto-breaking

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check --quiet job_service analysis_worker jobs_client localinfra migrations scripts examples tests docker
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) contract lint typecheck
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -x -m "not slow" $(PYTEST_ARGS)

migrate: $(STAMP)
	$(VENV)/bin/alembic upgrade head

run: $(STAMP)
	$(PY) -m scripts.devstack

demo: $(STAMP)
	$(PY) -m scripts.demo

bench: $(STAMP)
	$(PY) -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf .tools .run .bench .pytest_cache .mypy_cache .ruff_cache

# The chaos suite at full scale (about ten minutes): real processes, Postgres, S3 and fault
# proxies; prints its figures at the end. `make test` runs the same scenarios at CHAOS_SCALE=short.
.PHONY: chaos
chaos: $(STAMP)
	CHAOS_SCALE=full $(VENV)/bin/pytest -q tests/chaos $(PYTEST_ARGS)

# The stack in Docker (docker-compose.yml; docs/deploying.md). compose-up installs Docker and
# starts dockerd when missing, builds local base images when Docker Hub is out of reach, and
# returns once every service is healthy. compose-test brings up 2 job-services + 3 workers,
# kills one of each mid-job, restarts the stack, and cleans up everything it started.
.PHONY: compose-up compose-down compose-test
compose-up: $(STAMP)
	$(PY) -m scripts.compose up $(COMPOSE_ARGS)

compose-down: $(STAMP)
	$(PY) -m scripts.compose down $(COMPOSE_ARGS)

compose-test: $(STAMP)
	PY=$(PY) bash scripts/compose/test.sh $(PYTEST_ARGS)
# The analysis beside its peers on clips generated with ffmpeg (docs/analysis.md). `make test`
# runs the --quick variant through tests/bench_analysis/test_bench_analysis_quick.py.
.PHONY: bench-analysis
bench-analysis: $(STAMP)
	$(PY) -m tests.bench_analysis $(BENCH_ARGS)


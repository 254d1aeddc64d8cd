# One entry point for every task. `make test` and `make run` set themselves up on a fresh machine.
SHELL := /bin/bash
PY_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install proto proto-check test test-fast lint typecheck run demo migrate bench clean

help:
	@echo "make run        start Postgres, S3, migrations, job-service and two workers (foreground)"
	@echo "make demo       upload a generated video through the running stack and follow it to done"
	@echo "make test       install everything, check stubs and layering, run the whole suite"
	@echo "make proto      regenerate the gRPC stubs from protos/"
	@echo "make lint       ruff + import-linter;  make typecheck: mypy"
	@echo "make migrate    alembic upgrade head against JOB_SERVICE_DATABASE_URL"
	@echo "make bench      lease-path benchmark beside same-run baselines (raw SQL, PgQueuer, echo); BENCH_ARGS=--quick"
	@echo "make chaos      the chaos suite at full scale (faults across the fleet, ~10 min)"
	@echo "make bench-analysis  deep pass vs decode-only, PySceneDetect and ffmpeg on generated clips; BENCH_ARGS=--quick"

$(STAMP): pyproject.toml
	@command -v $(PY_BOOT) >/dev/null || { echo "need $(PY_BOOT) on PATH"; exit 1; }
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
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

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) proto-check lint typecheck
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
	rm -rf .run .bench .pytest_cache .mypy_cache .ruff_cache

# The chaos suite at full scale (about ten minutes): real processes, Postgres, S3 and fault
# proxies; prints its figures at the end. `make test` runs the same scenarios at CHAOS_SCALE=short.
.PHONY: chaos
chaos: $(STAMP)
	CHAOS_SCALE=full $(VENV)/bin/pytest -q tests/chaos $(PYTEST_ARGS)

# The analysis beside its peers on clips generated with ffmpeg (docs/analysis.md). `make test`
# runs the --quick variant through tests/bench_analysis/test_bench_analysis_quick.py.
.PHONY: bench-analysis
bench-analysis: $(STAMP)
	$(PY) -m tests.bench_analysis $(BENCH_ARGS)

#!/usr/bin/env bash
# `make compose-test`: the compose stack started for real (tests/compose/test_stack.py), bounded
# in time, and everything it started cleaned up even when it fails or is interrupted: the
# test project's containers, networks and volumes, and the dockerd if this run started it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PROJECT=vuj-compose-test
# From nothing on a loaded 2-core machine: ~3.5 min of base images, ~7 min of builds, ~5 min of
# test; with everything cached ~5 min.
LIMIT=${COMPOSE_TEST_TIMEOUT:-1500}

"$PY" -c "from scripts.compose.docker import ensure_installed; ensure_installed()" || exit 1
had_daemon=0
docker info >/dev/null 2>&1 && had_daemon=1

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  if docker info >/dev/null 2>&1; then
    docker-compose -p "$PROJECT" -f docker-compose.yml -f tests/compose/docker-compose.test.yml \
      down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  if [ "$had_daemon" = 0 ]; then
    "$PY" -c "from scripts.compose.docker import stop_started_daemon as s; s() and print('compose-test: stopped the dockerd it started')" || true
  fi
  exit "$code"
}
trap cleanup EXIT INT TERM

started=$(date +%s)
COMPOSE_TEST=1 timeout --signal=INT --kill-after=30 "$LIMIT" \
  "$PY" -m pytest -q -s -p no:cacheprovider tests/compose "$@"
echo "compose-test: $(( $(date +%s) - started )) s in all"

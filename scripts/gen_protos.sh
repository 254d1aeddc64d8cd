#!/usr/bin/env bash
# Regenerates the Python stubs (and .pyi type stubs) from protos/ into OUT (default
# protos/gen/python). Deterministic: same protos, same output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# protoc finds the mypy plugins (protoc-gen-mypy*) next to the interpreter.
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"
out=${1:-protos/gen/python}
rm -rf "$out/jobs"
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  $(find protos/jobs -name '*.proto' | sort)
# Packages, so setuptools and mypy find them.
find "$out/jobs" -type d -exec touch {}/__init__.py \;

#!/usr/bin/env bash
# Regenerates the Python stubs (and .pyi type stubs) from protos/ into protos/gen/python.
# Deterministic: same protos, same output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=protos/gen/python
rm -rf "$out/jobs"
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  $(find protos/jobs -name '*.proto' | sort)
# Packages, so setuptools and mypy find them.
find "$out/jobs" -type d -exec touch {}/__init__.py \;

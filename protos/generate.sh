#!/usr/bin/env bash
# Regenerates protos/*_pb2.py and protos/*_pb2_grpc.py (committed). Run from anywhere:
#   protos/generate.sh            (uses .venv/bin/python if present, else python)
# Generated from the repo root with -I. so the modules import as `from protos import params_pb2`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/params.proto

#!/usr/bin/env bash
# Sets up what the tests need (a local Python venv with pinned onnx/onnxruntime/numpy used
# as independent references) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
export SMOE_PYTHON="$PWD/.venv/bin/python"
cargo test --all-targets "$@"

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
# The HTML report is checked in a real headless browser: Debian's chromium.
if [ -z "${SMOE_CHROMIUM:-}" ] && ! [ -x /usr/bin/chromium ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null; then
    $sudo apt-get install -y -q chromium >/dev/null 2>&1 ||
      { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium >/dev/null 2>&1; } ||
      echo "warning: could not install Debian's chromium; tests/report_html.rs will fail (set SMOE_CHROMIUM)" >&2
  fi
fi
cargo test --all-targets "$@"

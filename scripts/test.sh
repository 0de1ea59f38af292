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
# The Olive pass (tests/olive_pass.rs, ignored by plain `cargo test`): olive-ai requires
# torch, whose Linux wheels on PyPI bring ~6 GB of CUDA libraries (it runs on CPU), so its
# venv lives outside the repository and is made once. Run on a plain `scripts/test.sh`;
# SMOE_SKIP_OLIVE=1 skips it, SMOE_OLIVE_VENV names another venv.
if [ $# -eq 0 ] && [ "${SMOE_SKIP_OLIVE:-0}" != 1 ]; then
  olive_venv=${SMOE_OLIVE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/smoe-opt/olive-venv}
  if [ ! -x "$olive_venv/bin/python" ]; then
    mkdir -p "$(dirname "$olive_venv")"
    "$py" -m venv "$olive_venv"
  fi
  "$olive_venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir \
    -r tests/requirements-olive.txt
  SMOE_OLIVE_PYTHON="$olive_venv/bin/python" cargo test --test olive_pass -- --ignored
fi

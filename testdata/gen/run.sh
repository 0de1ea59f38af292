#!/usr/bin/env bash
# Regenerates testdata/models/* with the real exporters. Developers only (CI never runs it).
# Usage: testdata/gen/run.sh [VENV_DIR]   (default /tmp/smoe-gen-venv; keep it outside the repo)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-/tmp/smoe-gen-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
if [ ! -d "$venv/tf4/transformers" ]; then
  "$venv/bin/pip" install -q --no-deps --target "$venv/tf4" -r "$here/requirements-tf4.txt"
fi
out="$here/../models"
PYTHONPATH="$venv/tf4" "$venv/bin/python" "$here/gen_models.py" --tf 4 --out "$out"
PYTHONPATH="$venv/tf4" "$venv/bin/python" "$here/gen_models.py" --tf 4 --only variants --out "$here/../variants"
"$venv/bin/python" "$here/gen_models.py" --tf 5 --out "$out"
"$venv/bin/python" "$here/gen_models.py" --tf 5 --only v5-stock --out "$out"
"$venv/bin/python" "$here/gen_models.py" --tf 5 --only deepseek --out "$out"
"$venv/bin/python" "$here/gen_models.py" --tf 5 --only gptoss --out "$out"
"$venv/bin/python" "$here/gen_models.py" --tf 5 --only phimoe --out "$out"
"$venv/bin/python" "$here/gen_models.py" --tf 5 --only tokenizer --out "$here/.."
"$venv/bin/python" "$here/gen_models.py" --tf 5 --only planted --out "$here/../planted"
"$venv/bin/python" "$here/gen_ortgenai.py" --out "$out" --only gptoss --precisions fp32 fp16
"$venv/bin/python" "$here/gen_ortgenai.py" --out "$out" --only gptoss --precisions fp16 --eps cuda
"$venv/bin/python" "$here/gen_ortgenai.py" --out "$out" --only lfm2moe --precisions fp32 fp16 int4 int8 int4-rowscale
"$venv/bin/python" "$here/gen_ortgenai.py" --out "$out" --only lfm2moe_wide --precisions int4
PYTHONPATH="$venv/tf4" "$venv/bin/python" "$here/train_lm.py" --out "$here/../lm"
du -sh "$out" "$here/../variants" "$here/../planted" "$here/../lm"

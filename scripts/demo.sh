#!/usr/bin/env bash
# Builds smoe-opt and runs the main job on the bundled example model (tract runtime, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
model=testdata/models/mixtral_v4_ts/model.onnx
mkdir -p demo-out
./target/release/smoe-opt inspect "$model"
./target/release/smoe-opt "$model" -o demo-out/model.onnx --method none
./target/release/smoe-opt inspect demo-out/model.onnx --json > demo-out/inspect.json
./target/release/smoe-opt calibrate "$model" --calib-text testdata/text/calib.txt \
    --tokenizer testdata/text/tokenizer.json --seq-len 64 --runtime tract -o demo-out/stats.json
echo "wrote demo-out/model.onnx, demo-out/inspect.json, demo-out/stats.json (+ stats.npz)"

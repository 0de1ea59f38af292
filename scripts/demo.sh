#!/usr/bin/env bash
# Builds smoe-opt and runs the main job on the bundled example model (tract runtime, no GPU):
# the trained MoE language model of testdata/lm, its experts compressed to half their bytes
# (auto plan: low rank, shared base + deltas, neuron pruning, merging, chosen by measured error),
# with held-out fidelity and perplexity before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
bin=./target/release/smoe-opt
lm=testdata/lm
mkdir -p demo-out
$bin inspect "$lm/model.onnx"
$bin "$lm/model.onnx" -o demo-out/model.onnx --target-size 0.5 \
    --calib-text "$lm/calib.txt" --tokenizer "$lm/tokenizer.json" --seq-len 128 --runtime tract \
    --eval-data "$lm/eval.npz" --report demo-out/report.json --report-html demo-out/report.html
$bin eval "$lm/model.onnx" --data "$lm/eval.npz" --runtime tract
$bin eval demo-out/model.onnx --data "$lm/eval.npz" --runtime tract
$bin calibrate "$lm/model.onnx" --calib-text "$lm/calib.txt" --tokenizer "$lm/tokenizer.json" \
    --seq-len 128 --runtime tract -o demo-out/stats.json
echo "wrote demo-out/model.onnx, demo-out/report.json, demo-out/report.html (open it in a browser), demo-out/stats.json (+ stats.npz)"

"""Calibration throughput: smoe-opt calibrate (tract and onnxruntime backends) against a
plain forward pass of the same model through onnxruntime's Python API on the same token
windows. Prints a markdown table of tokens/s.

    .venv/bin/python benches/calib_speed.py [MODEL ...] [--bin target/release/smoe-opt]

Data: testdata/text/calib.txt cut into 64-token windows by testdata/text/tokenizer.json
(tests/py/text_to_npz.py), batch 16. smoe-opt's figure includes its statistics (expert
outputs for every expert on every token, moments, reservoirs); the Python figure is the
forward pass alone.
"""
import argparse, os, re, subprocess, sys, tempfile, time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("models", nargs="*", default=["testdata/models/mixtral_v4_ts/model.onnx",
                                              "testdata/models/olmoe_v4_ts/model.onnx"])
ap.add_argument("--bin", default="target/release/smoe-opt")
a = ap.parse_args()
tmp = tempfile.mkdtemp()
data = os.path.join(tmp, "d.npz")
subprocess.run([sys.executable, "tests/py/text_to_npz.py", "testdata/text/calib.txt", "testdata/text/tokenizer.json",
                "64", data], check=True, capture_output=True)
d = np.load(data)
tokens = int(d["attention_mask"].sum())
print("| model | smoe-opt tract tok/s | smoe-opt onnxruntime tok/s | onnxruntime Python forward tok/s |")
print("|---|---|---|---|")
for m in a.models:
    rates = []
    for rt in ("tract", "ort"):
        p = subprocess.run([a.bin, "calibrate", m, "--calib", data, "--batch", "16", "--runtime", rt,
                            "-o", os.path.join(tmp, "s.json")], capture_output=True, text=True, check=True)
        rates.append(float(re.search(r"([0-9.]+) tokens/s", p.stderr).group(1)))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    t = time.perf_counter()
    for i in range(0, len(d["input_ids"]), 16):
        s.run(None, {k: d[k][i:i + 16] for k in names})
    py = tokens / (time.perf_counter() - t)
    name = os.path.basename(os.path.dirname(m))
    print(f"| {name} | {rates[0]:.0f} | {rates[1]:.0f} | {py:.0f} |")

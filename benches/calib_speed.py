"""Calibration throughput: smoe-opt calibrate (tract and onnxruntime backends, collecting
every statistic or routing only) against a plain forward pass of the same model through
onnxruntime's Python API on the same data. Prints a markdown table of tokens/s.

    .venv/bin/python benches/calib_speed.py [MODEL ...] [--bin target/release/smoe-opt]
        [--npz DATA.npz --batch B]

Data: by default testdata/text/calib.txt cut into 64-token windows by
testdata/text/tokenizer.json (tests/py/text_to_npz.py), batch 16; with --npz, that file's
arrays (the model's inputs, first axis = samples) and --batch samples per call. Tokens are
the attention mask's ones, else the product of the first input's leading axes.

Columns: `all` collects every statistic (every expert evaluated on every token for the
mean outputs, REAP, per-expert input moments, reservoirs: what `smoe-opt calibrate` does by
default); `routing` is `calibrate --collect routing` (frequencies, routing weights,
router-logit similarity, reservoirs; no expert runs outside the model's own), what an
m-smoe/average/prune-frequency reduction collects. The onnxruntime Python column runs the
plain forward pass alone, 2 intra-op threads like smoe-opt's session. Model loading and
session creation are excluded on both sides.
"""
import argparse, os, re, subprocess, sys, tempfile, time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("models", nargs="*", default=["testdata/models/mixtral_v4_ts/model.onnx",
                                              "testdata/models/olmoe_v4_ts/model.onnx"])
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--npz", help="model inputs (default: token windows of testdata/text)")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--reps", type=int, default=2, help="runs of each column; the best is shown")
ap.add_argument("--repeat", type=int, default=1,
                help="tile the data this many times (tiny models run for milliseconds otherwise)")
a = ap.parse_args()
tmp = tempfile.mkdtemp()
data = a.npz
if data is None:
    data = os.path.join(tmp, "d.npz")
    subprocess.run([sys.executable, "tests/py/text_to_npz.py", "testdata/text/calib.txt",
                    "testdata/text/tokenizer.json", "64", data], check=True, capture_output=True)
d = dict(np.load(data))
if a.repeat > 1:
    d = {k: np.concatenate([v] * a.repeat) for k, v in d.items()}
    data = os.path.join(tmp, "tiled.npz")
    np.savez(data, **d)
first = next(iter(d.values()))
tokens = int(d["attention_mask"].sum()) if "attention_mask" in d else int(
    np.prod(first.shape[:2] if first.ndim == 3 else first.shape[:1]))
samples = len(first)


def smoe(m, runtime, collect):
    best = 0.0
    for _ in range(a.reps):
        p = subprocess.run([a.bin, "calibrate", m, "--calib", data, "--batch", str(a.batch),
                            "--runtime", runtime, "--collect", collect,
                            "-o", os.path.join(tmp, "s.json")], capture_output=True, text=True)
        if p.returncode:
            return None
        best = max(best, float(re.search(r"([0-9.]+) tokens/s", p.stderr).group(1)))
    return best


def python_forward(m):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    best = 0.0
    for _ in range(a.reps):
        t = time.perf_counter()
        for i in range(0, samples, a.batch):
            s.run(None, {k: d[k][i:i + a.batch] for k in names})
        best = max(best, tokens / (time.perf_counter() - t))
    return best


fmt = lambda v: "—" if v is None else f"{v:.0f}"
src = os.path.relpath(a.npz) if a.npz else "testdata/text/calib.txt, 64-token windows"
print(f"data: {src}{f' x {a.repeat}' if a.repeat > 1 else ''}, {samples} samples, {tokens} tokens, "
      f"batch {a.batch}; best of {a.reps}\n")
print("| model | tract all | tract routing | onnxruntime all | onnxruntime routing "
      "| onnxruntime Python forward | routing / forward (onnxruntime) | all / forward |")
print("|---|---|---|---|---|---|---|---|")
for m in a.models:
    r = {(rt, c): smoe(m, rt, c) for rt in ("tract", "ort") for c in ("all", "routing")}
    py = python_forward(m)
    ratio = lambda v: "—" if v is None else f"{v / py:.2f}"
    name = os.path.basename(os.path.dirname(m)) or m
    print(f"| {name} | {fmt(r['tract', 'all'])} | {fmt(r['tract', 'routing'])} | {fmt(r['ort', 'all'])} "
          f"| {fmt(r['ort', 'routing'])} | {py:.0f} | {ratio(r['ort', 'routing'])} | {ratio(r['ort', 'all'])} |")
    sys.stdout.flush()

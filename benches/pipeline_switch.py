"""Whole merge pipeline on a Switch-base-sized MoE layer: 32 experts, H = 768, I = 3072,
ReLU FFNs with biases, top-1 softmax router (≈ 151 M parameters, 605 MB), exported with
TorchScript. Measures `smoe-opt --keep 0.25` (m-smoe: calibration on random hidden
states, grouping, weight-matching alignment of 24 experts at I = 3072, merge, emission,
held-out fidelity, save): wall time per stage and peak RSS. Prints a markdown table.

    /work/venvs/gen/bin/python benches/pipeline_switch.py [--bin target/release/smoe-opt] [--dir /tmp/smoe-switch]

Needs torch (the testdata/gen venv). The model is generated, not committed.
"""
import argparse, json, os, re, subprocess, sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "testdata", "gen"))
ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--dir", default="/tmp/smoe-switch")
ap.add_argument("--samples", type=int, default=32)
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
path = os.path.join(a.dir, "switch_layer.onnx")
if not os.path.exists(path):
    from gen_models import BiasedMoE, Block, init_weights
    torch.manual_seed(0)
    mod = Block(BiasedMoE(768, 3072, 32, 1, False, "relu")).eval()
    init_weights(mod, 0)
    x = torch.randn(1, 64, 768)
    torch.onnx.export(mod, (x,), path, input_names=["hidden_states"], output_names=["out"], opset_version=17,
                      dynamo=False, dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}})
out = os.path.join(a.dir, "switch_layer_q.onnx")
rep = os.path.join(a.dir, "report.json")
cmd = ["/usr/bin/time", "-v", a.bin, path, "-o", out, "--keep", "0.25", "--calib-random", str(a.samples),
       "--seq-len", "128", "--report", rep, "-q"]
p = subprocess.run(cmd, capture_output=True, text=True)
if p.returncode != 0:
    sys.exit(p.stderr)
wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", p.stderr).group(1)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024 ** 2
r = json.load(open(rep))
s = r["seconds"]
print(f"| model | params | experts | wall | calibrate | plan (group+align+merge) | emit | fidelity | peak RSS | rel_l2 |")
print("|---|---|---|---|---|---|---|---|---|---|")
print(f"| 32 x (768 x 3072) ReLU, top-1 | {r['params_before'] / 1e6:.0f} M -> {r['params_after'] / 1e6:.0f} M | "
      f"32 -> {r['layers'][0]['experts_after']} | {wall} | {s['calibrate']:.1f} s | {s['plan']:.1f} s | {s['emit']:.1f} s | "
      f"{s['fidelity']:.1f} s | {rss:.2f} GiB | {r['fidelity']['rel_l2']:.3f} |")
# Runtime memory: peak RSS of a fresh process that loads each model in onnxruntime and runs
# one 1x128 forward pass.
probe = ("import sys, resource, numpy as np, onnxruntime as ort; "
         "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
         "s.run(None, {'hidden_states': np.zeros((1, 128, 768), np.float32)}); "
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
mem = [int(subprocess.run([sys.executable, "-c", probe, m], check=True, capture_output=True, text=True).stdout) / 1024
       for m in (path, out)]
print(f"onnxruntime peak RSS loading + one forward: original {mem[0]:.0f} MiB, reduced {mem[1]:.0f} MiB; "
      f"files {os.path.getsize(path) / 2**20:.0f} MiB -> {os.path.getsize(out) / 2**20:.0f} MiB")
print(f"(calibration: {r['calibration']['samples_fit']} x 128 random hidden states fitted, "
      f"{r['calibration']['samples_heldout']} held out; {os.cpu_count()} CPUs)")

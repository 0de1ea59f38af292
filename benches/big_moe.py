"""A MoE model over 2 GiB (external data), reduced end to end: detection, calibration,
merging, fidelity (the runtimes get the model as files above the protobuf limit) and
an external-data output. Prints wall time, peak RSS and sizes.

    /work/venvs/gen/bin/python benches/big_moe.py [--bin target/release/smoe-opt] [--dir /tmp/smoe-bigmoe]

Needs torch (the testdata/gen venv). The model (8 ReLU experts of 2048 x 16384, top-2,
2.1 GB) is generated, not committed; the TorchScript exporter writes it with external data.
"""
import argparse, json, os, re, subprocess, sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "testdata", "gen"))
ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--dir", default="/tmp/smoe-bigmoe")
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
path = os.path.join(a.dir, "model.onnx")
if not os.path.exists(path):
    from gen_models import BiasedMoE, Block, init_weights
    torch.manual_seed(0)
    mod = Block(BiasedMoE(2048, 16384, 8, 2, False, "relu")).eval()
    init_weights(mod, 0)
    x = torch.randn(1, 16, 2048)
    torch.onnx.export(mod, (x,), path, input_names=["hidden_states"], output_names=["out"], opset_version=17,
                      dynamo=False, dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}})
size = sum(os.path.getsize(os.path.join(a.dir, f)) for f in os.listdir(a.dir) if not f.startswith("out"))
out = os.path.join(a.dir, "out.onnx")
rep = os.path.join(a.dir, "report.json")
p = subprocess.run(["/usr/bin/time", "-v", a.bin, path, "-o", out, "--keep", "0.5", "--calib-random", "16",
                    "--seq-len", "64", "--report", rep, "-q"], capture_output=True, text=True)
if p.returncode != 0:
    sys.exit(p.stderr)
wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", p.stderr).group(1)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024 ** 2
r = json.load(open(rep))
print("| model | on disk | experts | wall | calibrate | plan | fidelity | peak RSS | written |")
print("|---|---|---|---|---|---|---|---|---|")
s = r["seconds"]
print(f"| 8 x (2048 x 16384) ReLU, top-2 | {size / 2**30:.2f} GiB | 8 -> {r['layers'][0]['experts_after']} | {wall} | "
      f"{s['calibrate']:.1f} s | {s['plan']:.1f} s | {s['fidelity']:.1f} s | {rss:.2f} GiB | "
      f"{r['bytes_after'] / 2**30:.2f} GiB ({'external data' if r['saved'].get('data_path') else 'inline'}) |")

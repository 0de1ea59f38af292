"""Makes an ONNX model over 2 GiB with external data (not committed), then measures
`smoe-opt inspect` and a full `smoe-opt in -o out` round trip: wall time and peak RSS.

    python benches/big_external.py [--gib 2.2] [--dir /tmp/smoe-big] [--bin target/release/smoe-opt]

Needs numpy and onnx (the test venv has both). The data file is written with real bytes
(a repeated random pattern), so the round trip reads and writes every byte.
"""
import argparse, os, re, subprocess, sys, time

import numpy as np
import onnx
from onnx import TensorProto, helper

ap = argparse.ArgumentParser()
ap.add_argument("--gib", type=float, default=2.2)
ap.add_argument("--dir", default="/tmp/smoe-big")
ap.add_argument("--bin", default="target/release/smoe-opt")
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
model = os.path.join(a.dir, "big.onnx")
data = os.path.join(a.dir, "big.onnx.data")

n_tensors = 32
per = int(a.gib * (1 << 30)) // n_tensors // 4 // 1024 * 1024  # floats per tensor, multiple of 1024
rows = per // 1024
chunk = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32).tobytes()
inits, nodes, offset = [], [], 0
with open(data, "wb") as f:
    for t in range(n_tensors):
        nbytes = per * 4
        left = nbytes
        while left:
            w = min(left, len(chunk))
            f.write(chunk[:w])
            left -= w
        tp = TensorProto(name=f"w{t}", data_type=TensorProto.FLOAT, dims=[rows, 1024])
        tp.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(nbytes))):
            e = tp.external_data.add(); e.key, e.value = k, v
        offset += nbytes
        inits.append(tp)
        nodes.append(helper.make_node("ReduceSum", [f"w{t}"], [f"s{t}"], keepdims=0))
nodes.append(helper.make_node("Sum", [f"s{t}" for t in range(n_tensors)], ["y"]))
g = helper.make_graph(nodes, "big", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
with open(model, "wb") as f:
    f.write(m.SerializeToString())
total = os.path.getsize(data)
print(f"model {model}: {total / (1 << 30):.2f} GiB external data in {n_tensors} tensors")


def measure(args):
    t = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", a.bin, *args], capture_output=True, text=True)
    wall = time.time() - t
    if p.returncode:
        sys.exit(p.stderr)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return wall, rss / 1024


rows_out = []
rows_out.append(("inspect", *measure(["inspect", model])))
out = os.path.join(a.dir, "out.onnx")
rows_out.append(("round trip (auto external)", *measure([model, "-o", out, "-q"])))
written = [f for f in os.listdir(a.dir) if f.startswith("out.onnx.") and f.endswith(".data")]
assert len(written) == 1, f"output over 2 GiB must use one external data file: {written}"
same = subprocess.run(["cmp", data, os.path.join(a.dir, written[0])]).returncode == 0
print(f"\n| command | wall s | peak RSS MiB |\n|---|---|---|")
for name, wall, rss in rows_out:
    print(f"| {name} | {wall:.2f} | {rss:.0f} |")
print(f"\ndata file byte-identical after round trip: {same} ({total} bytes)")

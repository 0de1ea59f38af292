"""Peak memory of a large multi-layer MoE model, one-shot vs segment by segment.

    python benches/big_sequential.py [--gib 8] [--layers 30] [--dir /tmp/smoe-bigseq]
        [--bin target/release/smoe-opt] [--pipelines sequential,one-shot] [--target 0.5]
    python benches/big_sequential.py ... --keep 0.5 [--memory-limits 4G,1T]

Makes (once, not committed) a stack of onnxruntime fused MoE layers, x <- x + MoE(x, x·Wr)
(com.microsoft.MoE, SwiGLU, 8 experts, top-2, as onnxruntime-genai writes it), float32
weights in one external data file, sized to --gib. Then runs
`smoe-opt --target-size T --compress low-rank --pipeline P` (or, with --keep F, the m-smoe
merge `--keep F` under each `--memory-limit`: a limit below the model's needs makes the
models run, and the layers merge, segment by segment) with calibration and held-out
samples from a .npz, and prints wall time, peak RSS of the whole process (runtimes included,
/usr/bin/time), and the issue's bound 1.5 GiB + 3 x one layer's experts in float32.
Needs numpy and onnx (the test venv) and onnxruntime's shared library (the fused op runs
in onnxruntime only).
"""
import argparse, json, os, re, subprocess, sys, time

import numpy as np
import onnx
from onnx import TensorProto, helper

ap = argparse.ArgumentParser()
ap.add_argument("--gib", type=float, default=8.0)
ap.add_argument("--layers", type=int, default=30)
ap.add_argument("--hidden", type=int, default=1024)
ap.add_argument("--experts", type=int, default=8)
ap.add_argument("--samples", type=int, default=256)
ap.add_argument("--dir", default="/tmp/smoe-bigseq")
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--pipelines", default="sequential,one-shot")
ap.add_argument("--target", default="0.5")
ap.add_argument("--keep", default=None, help="merge (m-smoe) to this fraction of the experts")
ap.add_argument("--memory-limits", default="4G,1T", help="with --keep: the runs' --memory-limit")
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
L, H, N = a.layers, a.hidden, a.experts
# Per layer: fc1 [N, 2I, H] + fc2 [N, H, I] = 3·N·I·H floats.
I = int(a.gib * (1 << 30) / 4 / L / (3 * N * H)) // 64 * 64
layer_bytes = 3 * N * I * H * 4
path = os.path.join(a.dir, f"model_{L}x{H}x{I}.onnx")
data_name = os.path.basename(path) + ".data"
if not os.path.exists(path):
    rng = np.random.default_rng(0)
    inits, nodes, offset = [], [], 0
    with open(os.path.join(a.dir, data_name), "wb") as f:
        def ext(name, arr):
            global offset
            b = arr.tobytes()
            f.write(b)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(b)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(b)
            inits.append(t)

        x = "x"
        for l in range(L):
            ext(f"l{l}.router", (rng.standard_normal((H, N)) / H ** 0.5).astype(np.float32))
            fc1 = np.empty((N, 2 * I, H), np.float32)
            for e in range(N):
                fc1[e] = rng.standard_normal((2 * I, H), dtype=np.float32) / H ** 0.5
            ext(f"l{l}.fc1", fc1)
            del fc1
            fc2 = np.empty((N, H, I), np.float32)
            for e in range(N):
                fc2[e] = rng.standard_normal((H, I), dtype=np.float32) / (I ** 0.5 * L ** 0.5)
            ext(f"l{l}.fc2", fc2)
            del fc2
            nodes += [
                helper.make_node("MatMul", [x, f"l{l}.router"], [f"l{l}.logits"], name=f"l{l}/router"),
                helper.make_node("MoE", [x, f"l{l}.logits", f"l{l}.fc1", "", f"l{l}.fc2"], [f"l{l}.moe"],
                                 name=f"l{l}/moe", domain="com.microsoft", k=2, activation_type="swiglu",
                                 normalize_routing_weights=1, swiglu_fusion=1, activation_alpha=1.0,
                                 activation_beta=0.0),
                helper.make_node("Add", [x, f"l{l}.moe"], [f"l{l}.out"], name=f"l{l}/residual"),
            ]
            x = f"l{l}.out"
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "big_sequential", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                          producer_name="benches/big_sequential.py")
    m.ir_version = 9
    onnx.save(m, path)
calib = os.path.join(a.dir, "calib.npz")
held = os.path.join(a.dir, "heldout.npz")
if not os.path.exists(calib):
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.standard_normal((a.samples, H)).astype(np.float32))
    np.savez(held, x=rng.standard_normal((64, H)).astype(np.float32))
size = os.path.getsize(path) + os.path.getsize(os.path.join(a.dir, data_name))
bound = 1.5 * (1 << 30) + 3 * layer_bytes
print(f"model: {L} layers x {N} experts of H {H}, I {I}: {size / (1 << 30):.2f} GiB on disk, "
      f"one layer's experts {layer_bytes / (1 << 20):.0f} MiB; bound {bound / (1 << 30):.2f} GiB")
print("| run | wall s | peak RSS GiB | within bound | models ran | fidelity rel_l2 |")
print("|---|---|---|---|---|---|")
if a.keep:
    runs = [(f"--keep {a.keep}, --memory-limit {m}", ["--keep", a.keep, "--memory-limit", m])
            for m in a.memory_limits.split(",")]
else:
    runs = [(p, ["--target-size", a.target, "--compress", "low-rank", "--pipeline", p])
            for p in a.pipelines.split(",")]
for k, (label, flags) in enumerate(runs):
    out = os.path.join(a.dir, f"out_{k}.onnx")
    rep = os.path.join(a.dir, f"report_{k}.json")
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-v", a.bin, path, "-o", out, "--calib", calib, "--eval-data", held,
                        *flags, "--report", rep, "-q"],
                       capture_output=True, text=True)
    wall = time.time() - t
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    if r.returncode != 0:
        print(f"| {label} | {wall:.0f} | {rss / (1 << 30):.2f} | failed: {r.stderr.strip().splitlines()[-1][:120]} | | |")
        continue
    j = json.load(open(rep))
    print(f"| {label} | {wall:.0f} | {rss / (1 << 30):.2f} | {rss <= bound} | "
          f"{'segment by segment' if j['execution']['segments'] else 'whole'} | {j['fidelity']['rel_l2']:.4f} |")
    sys.stdout.flush()

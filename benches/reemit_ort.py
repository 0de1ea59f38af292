"""Prefill and single-token decode latency in onnxruntime (CPU): the exporter's MoE graph
against smoe-opt's re-emitted portable form (and the fused op where it fits).

    python benches/reemit_ort.py MODEL.onnx [MODEL.onnx ...] [--bin target/release/smoe-opt]

Models take `hidden_states [B, S, H]` (single blocks) or `input_ids`/`attention_mask`/
`position_ids` (language models). Prints a markdown table; ratio = re-emitted / exporter
(below 1 = faster). Median of repeated runs after warm-up, intra-op threads = 2.
"""
import argparse, os, statistics, subprocess, tempfile, time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("models", nargs="+")
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--reps", type=int, default=20)
a = ap.parse_args()


def feed(sess, b, s):
    rng = np.random.default_rng(0)
    f = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            f[i.name] = rng.integers(0, 256, (b, s), dtype=np.int64)
        elif i.name in ("attention_mask",):
            f[i.name] = np.ones((b, s), np.int64)
        elif i.name == "position_ids":
            f[i.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        else:
            h = i.shape[-1]
            f[i.name] = rng.standard_normal((b, s, h)).astype(np.float32)
    return f


def timeit(path, b, s):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    f = feed(sess, b, s)
    for _ in range(3):
        sess.run(None, f)
    ts = []
    for _ in range(a.reps):
        t = time.perf_counter()
        sess.run(None, f)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


print("| model | shape | exporter ms | portable ms | ratio | fused ms | ratio |")
print("|---|---|---|---|---|---|---|")
tmp = tempfile.mkdtemp()
for m in a.models:
    name = os.path.basename(os.path.dirname(m)) or m
    outs = {}
    for form in ("portable", "ort-fused"):
        o = os.path.join(tmp, f"{name}-{form}.onnx")
        subprocess.run([a.bin, m, "-o", o, "--method", "none", "--emit", form, "-q"], check=True)
        outs[form] = o
    for b, s, label in ((1, 512, "prefill 1x512"), (1, 1, "decode 1x1"), (8, 1, "decode 8x1")):
        base = timeit(m, b, s)
        port = timeit(outs["portable"], b, s)
        fused = timeit(outs["ort-fused"], b, s)
        print(f"| {name} | {label} | {base:.3f} | {port:.3f} | {port / base:.2f} | {fused:.3f} | {fused / base:.2f} |")

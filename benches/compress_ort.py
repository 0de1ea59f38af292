"""onnxruntime (CPU) latency of compressed MoE blocks against the original, at half the expert
bytes: prefill 1x512 and single-token decode 1x1.

    python benches/compress_ort.py MODEL.onnx [MODEL.onnx ...] [--bin target/release/smoe-opt]

Each model is compressed with `--target-size 0.5` for every fixed family (low-rank, neurons,
base-delta), calibrated on random hidden states (`--calib-random`, timing only: the weights of
the bench blocks are random). Prints a markdown table: median ms after warm-up, intra-op threads
= 2, ratio = compressed / original (below 1 = faster), and the routed multiply-adds per token
the report gives (flops after / before). "re-emitted" is the same block written by smoe-opt
without compression (`--method none`), so the last column isolates what compression buys.
"""
import argparse, json, os, statistics, subprocess, tempfile, time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("models", nargs="+")
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--reps", type=int, default=20)
a = ap.parse_args()


def timeit(path, b, s):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    i = sess.get_inputs()[0]
    f = {i.name: np.random.default_rng(0).standard_normal((b, s, i.shape[-1])).astype(np.float32)}
    for _ in range(3):
        sess.run(None, f)
    ts = []
    for _ in range(a.reps):
        t = time.perf_counter()
        sess.run(None, f)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


print("| model | family | flops after/before | shape | exporter ms | re-emitted ms | compressed ms | ratio to exporter | ratio to re-emitted |")
print("|---|---|---|---|---|---|---|---|---|")
tmp = tempfile.mkdtemp()
for m in a.models:
    name = os.path.basename(os.path.dirname(m)) or m
    base = {shape: timeit(m, *shape) for shape in ((1, 512), (1, 1))}
    re = os.path.join(tmp, f"{name}-none.onnx")
    subprocess.run([a.bin, m, "-o", re, "--method", "none", "-q"], check=True)
    reemit = {shape: timeit(re, *shape) for shape in ((1, 512), (1, 1))}
    for family in ("low-rank", "neurons", "base-delta"):
        o = os.path.join(tmp, f"{name}-{family}.onnx")
        rep = o + ".json"
        subprocess.run([a.bin, m, "-o", o, "--target-size", "0.5", "--compress", family,
                        "--calib-random", "32", "--seq-len", "64", "--holdout", "0",
                        "--report", rep, "-q"], check=True)
        c = json.load(open(rep))["compression"]
        for (b, s), label in (((1, 512), "prefill 1x512"), ((1, 1), "decode 1x1")):
            t = timeit(o, b, s)
            print(f"| {name} | {family} | {c['flops_after'] / c['flops_before']:.2f} | {label} | "
                  f"{base[(b, s)]:.3f} | {reemit[(b, s)]:.3f} | {t:.3f} | {t / base[(b, s)]:.2f} | "
                  f"{t / reemit[(b, s)]:.2f} |", flush=True)

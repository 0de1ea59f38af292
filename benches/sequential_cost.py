"""Cost of the sequential pipeline on the trained LMs (testdata/lm, testdata/lm_upcycled):
wall time and peak RSS of the whole smoe-opt process (onnxruntime/tract included) for the
one-shot fit, the sequential refit segment by segment (the default) and the sequential refit
on the whole model (`SMOE_SEQUENTIAL_WHOLE_MODEL=1`, the fallback), and whether the two
sequential refits wrote the same bytes.

    python3 benches/sequential_cost.py [--bin target/release/smoe-opt] [--fraction 0.5]

Prints a markdown table (BENCHMARKS.md, "Sequential vs one-shot fitting").
"""
import argparse, filecmp, os, subprocess, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--fraction", default="0.5")
a = ap.parse_args()
tmp = tempfile.mkdtemp()


def run(lm, pipeline, whole=False):
    out = os.path.join(tmp, f"{os.path.basename(lm)}_{pipeline}_{int(whole)}.onnx")
    calib = ["--calib-text", f"{lm}/calib.txt", "--tokenizer", f"{lm}/tokenizer.json",
             "--seq-len", "128"]
    env = dict(os.environ)
    if whole:
        env["SMOE_SEQUENTIAL_WHOLE_MODEL"] = "1"
    t = time.time()
    p = subprocess.Popen([a.bin, f"{lm}/model.onnx", "-o", out, "-q", "--target-size",
                          a.fraction, "--compress", "low-rank", "--pipeline", pipeline] + calib,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.time() - t
    if status != 0:
        raise SystemExit(f"{lm} {pipeline}: failed: {p.stderr.read().decode()[-400:]}")
    return out, wall, usage.ru_maxrss / 1024


print(f"| model | pipeline (low-rank, {float(a.fraction):.0%} of expert bytes) | wall s | peak RSS MiB |")
print("|---|---|---|---|")
for lm in ("testdata/lm", "testdata/lm_upcycled"):
    one = run(lm, "one-shot")
    seg = run(lm, "sequential")
    whole = run(lm, "sequential", whole=True)
    same = filecmp.cmp(seg[0], whole[0], shallow=False)
    for label, r in (("one-shot", one), ("sequential, segment by segment", seg),
                     ("sequential, whole model", whole)):
        print(f"| {lm} | {label} | {r[1]:.1f} | {r[2]:.0f} |")
    print(f"| {lm} | segment-by-segment bytes == whole-model bytes | {same} | |")

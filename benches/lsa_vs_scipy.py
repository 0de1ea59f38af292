"""Exact assignment solver vs scipy's linear_sum_assignment on the same weight-matching
cost matrices (I = 1024, 3072, 14336 by default). Prints a markdown table.

    .venv/bin/pip install -r benches/requirements.txt
    .venv/bin/python benches/lsa_vs_scipy.py [--sizes 1024 3072 14336] [--dir /tmp/smoe-lsa]

Cost matrices are built the way alignment builds them: C = W_ref · W_tgtᵀ for two experts'
[I, H] projections (H = 1024), the target a neuron-permuted copy of the reference plus noise
of the same magnitude (so the optimum is far from trivial). Both solvers maximise; their
objectives must agree (both are exact).
"""
import argparse, os, re, subprocess, time

import numpy as np
from scipy.optimize import linear_sum_assignment

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 3072, 14336])
ap.add_argument("--dir", default="/tmp/smoe-lsa")
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
for f in os.listdir(a.dir):
    os.remove(os.path.join(a.dir, f))
rng = np.random.default_rng(0)
h = 1024
rows = {}
for n in a.sizes:
    ref = rng.standard_normal((n, h), dtype=np.float32)
    tgt = ref[rng.permutation(n)] + rng.standard_normal((n, h), dtype=np.float32)
    c = (ref @ tgt.T).astype(np.float64)
    np.save(os.path.join(a.dir, f"cost_{n:06d}.npy"), c)
    t = time.perf_counter()
    r, col = linear_sum_assignment(c, maximize=True)
    rows[n] = dict(scipy=time.perf_counter() - t, scipy_obj=float(c[r, col].sum()))
    del c
out = subprocess.run(["cargo", "bench", "-q", "--bench", "lsa", "--", a.dir], check=True,
                     capture_output=True, text=True).stdout
for line in out.splitlines():
    m = re.match(r"(\d+) ([0-9.]+) (-?[0-9.]+)", line)
    if m:
        n = int(m.group(1))
        rows[n].update(ours=float(m.group(2)), ours_obj=float(m.group(3)))
print("| I | scipy linear_sum_assignment (s) | smoe-opt solve_max (s) | speed-up | same optimum |")
print("|---|---|---|---|---|")
for n in a.sizes:
    r = rows[n]
    same = abs(r["scipy_obj"] - r["ours_obj"]) <= 1e-9 * abs(r["scipy_obj"]) + 1e-6
    print(f"| {n} | {r['scipy']:.3f} | {r['ours']:.3f} | {r['scipy'] / r['ours']:.2f}x | {'yes' if same else 'NO'} |")

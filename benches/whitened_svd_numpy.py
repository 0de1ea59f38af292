"""The linear algebra of benches/whitened_svd.rs in numpy (float64, LAPACK via numpy's OpenBLAS):
per expert the input Grams, Cholesky whitening, SVD of Lᵀ·Wᵀ and the triangular solve, for one
layer of random experts; prints seconds, then runs the Rust bench on the same shapes.

    python benches/whitened_svd_numpy.py [H I EXPERTS ROWS]     (default 1024 3584 4 4096)
"""
import subprocess, sys, time

import numpy as np
import scipy.linalg

h, i, e, rows = (int(v) for v in (sys.argv[1:5] if len(sys.argv) >= 5 else (1024, 3584, 4, 4096)))
rng = np.random.default_rng(0)


def whitened(w, g):
    g = g + 1e-3 * np.trace(g) / g.shape[0] * np.eye(g.shape[0])
    l = np.linalg.cholesky(g)
    u, s, vt = np.linalg.svd(l.T @ w.T, full_matrices=False)
    return scipy.linalg.solve_triangular(l.T, u * s, lower=False), s, vt


ws = [(rng.uniform(-1, 1, (i, h)), rng.uniform(-1, 1, (i, h)), rng.uniform(-1, 1, (h, i))) for _ in range(e)]
xs = [rng.uniform(-1, 1, (rows, h)) for _ in range(e)]
hs = [rng.uniform(-1, 1, (rows, i)) for _ in range(e)]
t = time.perf_counter()
for (g, u, d), x, hh in zip(ws, xs, hs):
    gx, gh = x.T @ x, hh.T @ hh
    whitened(g, gx), whitened(u, gx), whitened(d, gh)
np_s = time.perf_counter() - t
out = subprocess.run(["cargo", "bench", "-q", "--bench", "whitened_svd", "--", str(h), str(i), str(e), str(rows)],
                     check=True, capture_output=True, text=True).stdout.split()[0]
rs = float(out)
print("| H | I | experts | rows | numpy s | smoe-opt (faer) s | speed-up |")
print("|---|---|---|---|---|---|---|")
print(f"| {h} | {i} | {e} | {rows} | {np_s:.2f} | {rs:.2f} | {np_s / rs:.2f}x |")

"""The merge plan's weight-matching work on one MoE layer, numpy/scipy against smoe-opt, on the
same arrays. Prints a markdown table.

    .venv/bin/pip install -r benches/requirements.txt
    .venv/bin/python benches/align_numpy.py [--h 4096 --i 14336 --experts 8] [--dir /tmp/smoe-align]

The layer: SwiGLU experts (gate, up [I, H], down [H, I]) in float32; expert 2k+1 is a
neuron-permuted copy of expert 2k plus noise of the same magnitude, so each pair has an
alignment worth finding (as `--keep 0.5` pairs experts). Per pair, both do what the merge plan
does with weight-matching alignment (docs/algorithm.md §3–4):

1. the similarity C = G_r·G_tᵀ + U_r·U_tᵀ + D_rᵀ·D_t, products in float32, C in float64;
2. the exact assignment maximising Σ C[a, π(a)] (scipy's linear_sum_assignment / smoe-opt's
   solve_max);
3. the permutation of the target's neurons and the weight distances before and after;
4. the frequency-weighted average of the pair.

numpy uses OpenBLAS with every core; smoe-opt is `cargo bench --bench align`; `--baseline`
adds the same bench built from an earlier commit. All must reach the same assignment
objective (every solver is exact).
"""
import argparse, os, re, subprocess, time

import numpy as np
from scipy.optimize import linear_sum_assignment

ap = argparse.ArgumentParser()
ap.add_argument("--h", type=int, default=4096)
ap.add_argument("--i", type=int, default=14336)
ap.add_argument("--experts", type=int, default=8)
ap.add_argument("--dir", default="/tmp/smoe-align")
ap.add_argument("--bench", default="cargo bench -q --bench align --",
                help="the smoe-opt side's command (DIR is appended)")
ap.add_argument("--baseline", default=None,
                help="an earlier build's bench command (DIR is appended), e.g. the same bench "
                     "built from an older commit: a third column")
a = ap.parse_args()
assert a.experts % 2 == 0
os.makedirs(a.dir, exist_ok=True)
for f in os.listdir(a.dir):
    os.remove(os.path.join(a.dir, f))
rng = np.random.default_rng(0)
h, n = a.h, a.i
for k in range(0, a.experts, 2):
    ref = {m: rng.standard_normal(s, dtype=np.float32) * 0.02
           for m, s in (("gate", (n, h)), ("up", (n, h)), ("down", (h, n)))}
    p = rng.permutation(n)
    tgt = {"gate": ref["gate"][p], "up": ref["up"][p], "down": ref["down"][:, p]}
    for m in tgt:
        tgt[m] = tgt[m] + rng.standard_normal(tgt[m].shape, dtype=np.float32) * 0.02
    for e, w in ((k, ref), (k + 1, tgt)):
        for m, x in w.items():
            np.save(os.path.join(a.dir, f"e{e}_{m}.npy"), np.ascontiguousarray(x))
    del ref, tgt


def load(k):
    return {m: np.load(os.path.join(a.dir, f"e{k}_{m}.npy")) for m in ("gate", "up", "down")}


def dist(x, y):
    return float(np.sqrt(sum(np.sum((x[m].astype(np.float64) - y[m]) ** 2) for m in x)))


rows = []
for k in range(0, a.experts, 2):
    r, t = load(k), load(k + 1)
    t0 = time.perf_counter()
    c = r["gate"] @ t["gate"].T
    c += r["up"] @ t["up"].T
    c += r["down"].T @ t["down"]
    c = c.astype(np.float64)
    t1 = time.perf_counter()
    _, col = linear_sum_assignment(c, maximize=True)
    t2 = time.perf_counter()
    obj = float(c[np.arange(n), col].sum())
    del c
    al = {"gate": t["gate"][col], "up": t["up"][col], "down": t["down"][:, col]}
    dist(r, t), dist(r, al)
    t3 = time.perf_counter()
    merged = {m: ((0.6 * r[m].astype(np.float64) + 0.4 * al[m]) / 1.0).astype(np.float32) for m in r}
    t4 = time.perf_counter()
    del merged, al, r, t
    rows.append(dict(sim=t1 - t0, lsa=t2 - t1, perm=t3 - t2, merge=t4 - t3, obj=obj))



def ours(command):
    out = subprocess.run(command.split() + [a.dir], check=True, capture_output=True,
                         text=True).stdout
    got = []
    for line in out.splitlines():
        m = re.match(r"(\d+) ([0-9.]+) ([0-9.]+) ([0-9.]+) ([0-9.]+) (-?[0-9.e+]+)", line)
        if m:
            got.append(dict(sim=float(m.group(2)), lsa=float(m.group(3)),
                            perm=float(m.group(4)), merge=float(m.group(5)),
                            obj=float(m.group(6))))
    assert len(got) == len(rows), out
    return got


sides = [("numpy/scipy", rows)]
if a.baseline:
    sides.append(("smoe-opt before", ours(a.baseline)))
sides.append(("smoe-opt", ours(a.bench)))
new_side = sides[-1][1]

print(f"H {h}, I {n}, {a.experts} experts ({len(rows)} pairs), {os.cpu_count()} cores\n")
head = " | ".join(f"{name} s" for name, _ in sides)
ratios = " | ".join(f"{name} / smoe-opt" for name, _ in sides[:-1])
print(f"| stage | {head} | {ratios} |")
print("|---|" + "---|" * (2 * len(sides) - 1))
stages = (("sim", "similarity C (3 products)"), ("lsa", "exact assignment"),
          ("perm", "permute + distances"), ("merge", "weighted merge"))
for key, name in stages + (("total", "**total**"),):
    def tot(side):
        keys = [k for k, _ in stages] if key == "total" else [key]
        return sum(sum(q[k] for k in keys) for q in side)
    y = tot(new_side)
    cells = " | ".join(f"{tot(side):.2f}" for _, side in sides)
    rats = " | ".join(f"{tot(side) / y:.2f}x" for _, side in sides[:-1])
    print(f"| {name} | {cells} | {rats} |")
same = all(abs(p["obj"] - q["obj"]) <= 1e-6 * abs(p["obj"]) + 1e-6
           for _, side in sides[1:] for p, q in zip(rows, side))
print(f"\nsame assignment objective on every pair, every side: {'yes' if same else 'NO'}")

"""Independent numpy reference for retraining-free expert compression on a bundled LM.

Re-implements, without smoe-opt, the compression families from the design notes on a
Mixtral-style ONNX LM (per-expert MatMul initializers, as in testdata/lm):
  - plain SVD at a uniform rank,
  - activation-aware (whitened) SVD at a uniform rank,
  - activation-aware SVD with one global greedy rank allocation (energies normalised per
    matrix type and layer),
then writes the reconstructed weights back (dense, same shapes) and scores held-out
perplexity with onnxruntime. Used to check that smoe-opt's numbers for a model are what
the method gives on that model, not an artefact of the implementation.

    .venv/bin/python benches/lowrank_numpy_check.py testdata/lm 0.75 0.5 0.25
"""
import argparse
import heapq
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("lm")
ap.add_argument("fractions", nargs="+", type=float)
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--seq", type=int, default=128)
a = ap.parse_args()
lm = Path(a.lm)
model = onnx.load(str(lm / "model.onnx"))
inits = {t.name: t for t in model.graph.initializer}
info = json.loads(subprocess.run([a.bin, "inspect", str(lm / "model.onnx"), "--json"],
                                 check=True, capture_output=True, text=True).stdout)


def consumers(name):
    return [n for n in model.graph.node if name in n.input]


def find_layers(blocks):
    """Router and per-expert (gate, up, down) initializer names, found from the graph: the
    gate is the [H, I] MatMul whose output feeds a Sigmoid (SiLU), up the other [H, I] MatMul
    on the same input, down the MatMul after their product. Graph order gives the layers."""
    h, i, n_exp = blocks[0]["hidden"], blocks[0]["intermediate"], blocks[0]["experts"]
    routers = [t.name for t in model.graph.initializer if list(t.dims) == [h, n_exp]]
    experts = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or list(inits[node.input[1]].dims) != [h, i]:
            continue
        if not any(n.op_type == "Sigmoid" for n in consumers(node.output[0])):
            continue
        up = [n for n in consumers(node.input[0]) if n.op_type == "MatMul" and n.input[1] != node.input[1]
              and n.input[1] in inits][0]
        mul = [n for n in consumers(up.output[0]) if n.op_type == "Mul"][0]
        down = [n for n in consumers(mul.output[0]) if n.op_type == "MatMul"][0]
        experts.append({"gate": node.input[1], "up": up.input[1], "down": down.input[1]})
    assert len(routers) == len(blocks) and len(experts) == n_exp * len(blocks), (routers, len(experts))
    return [{"input": b["input"], "router": routers[k], "experts": experts[k * n_exp:(k + 1) * n_exp],
             "top_k": b["top_k"]} for k, b in enumerate(blocks)]


layers = find_layers(info["moe_blocks"])


def windows(ids, seq):
    n = len(ids) // seq
    x = np.array(ids[: n * seq], dtype=np.int64).reshape(n, seq)
    return x, np.ones_like(x), np.tile(np.arange(seq, dtype=np.int64), (n, 1))


tok = Tokenizer.from_file(str(lm / "tokenizer.json"))
ids = tok.encode((lm / "calib.txt").read_text()).ids
cx, cm, cp = windows(ids, a.seq)

# Capture every MoE block's input on the calibration windows.
probe = onnx.ModelProto()
probe.CopyFrom(model)
for layer in layers:
    probe.graph.output.append(onnx.helper.make_tensor_value_info(layer["input"], onnx.TensorProto.FLOAT, None))
sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
names = [o.name for o in sess.get_outputs()]
xs = {layer["input"]: [] for layer in layers}
for s in range(0, len(cx), 8):
    out = sess.run(None, {"input_ids": cx[s:s + 8], "attention_mask": cm[s:s + 8], "position_ids": cp[s:s + 8]})
    for layer in layers:
        v = out[names.index(layer["input"])]
        xs[layer["input"]].append(v.reshape(-1, v.shape[-1]))
xs = {k: np.concatenate(v).astype(np.float64) for k, v in xs.items()}
print(f"calibration: {len(cx)} windows of {a.seq} tokens", file=sys.stderr)


def W(name):
    return numpy_helper.to_array(inits[name]).astype(np.float64)


def silu(z):
    return z / (1 + np.exp(-z))


def whiten(x):
    g = x.T @ x
    g += 1e-3 * np.trace(g) / len(g) * np.eye(len(g))
    return np.linalg.cholesky(g)


# Per matrix: whitening factor L (None for plain), weight, type, layer.
mats = []
for li, layer in enumerate(layers):
    x = xs[layer["input"]]
    logits = x @ W(layer["router"])
    top = np.argsort(-logits, axis=1)[:, : layer["top_k"]]
    for e, ex in enumerate(layer["experts"]):
        xe = x[(top == e).any(axis=1)]
        h = silu(xe @ W(ex["gate"])) * (xe @ W(ex["up"]))
        lx, lh = whiten(xe), whiten(h)
        for kind, name, l in (("gate", ex["gate"], lx), ("up", ex["up"], lx), ("down", ex["down"], lh)):
            w = W(name)
            u, s, vt = np.linalg.svd(l.T @ w, full_matrices=False)
            pu, ps, pvt = np.linalg.svd(w, full_matrices=False)
            mats.append(dict(layer=li, kind=kind, name=name, w=w, l=l, u=u, s=s, vt=vt, pu=pu, ps=ps, pvt=pvt))


def reconstruct(m, r, plain):
    if r >= min(m["w"].shape):
        return m["w"]
    if plain:
        return (m["pu"][:, :r] * m["ps"][:r]) @ m["pvt"][:r]
    lw = (m["u"][:, :r] * m["s"][:r]) @ m["vt"][:r]
    return np.linalg.solve(m["l"].T, lw)


def uniform(frac):
    out = {}
    for m in mats:
        i, o = m["w"].shape
        out[m["name"]] = int(frac * i * o / (i + o))
    return out


def global_alloc(frac):
    """Greedy over all matrices by normalised energy gain per stored parameter; dense when cheaper."""
    total = {}
    for m in mats:
        total[(m["layer"], m["kind"])] = total.get((m["layer"], m["kind"]), 0) + (m["s"] ** 2).sum()
    budget = frac * sum(m["w"].size for m in mats)
    ranks = {m["name"]: 0 for m in mats}
    used = sum(m["w"].shape[0] + m["w"].shape[1] for m in mats) * 0  # rank 0 stores nothing
    heap = []
    for k, m in enumerate(mats):
        e = m["s"] ** 2 / total[(m["layer"], m["kind"])]
        heapq.heappush(heap, (-e[0] / sum(m["w"].shape), k))
    while heap:
        g, k = heapq.heappop(heap)
        m = mats[k]
        i, o = m["w"].shape
        r = ranks[m["name"]]
        cost = i + o
        if (r + 1) * (i + o) >= i * o:  # going dense: pay the rest of the dense matrix
            cost = i * o - r * (i + o)
        if used + cost > budget:
            continue
        used += cost
        if (r + 1) * (i + o) >= i * o:
            ranks[m["name"]] = min(i, o)
            continue
        ranks[m["name"]] = r + 1
        e = m["s"] ** 2 / total[(m["layer"], m["kind"])]
        if r + 1 < len(e):
            nxt = e[r + 1] / (i + o)
            if (r + 2) * (i + o) >= i * o:  # next step is the dense remainder
                nxt = e[r + 1:].sum() / (i * o - (r + 1) * (i + o))
            heapq.heappush(heap, (-nxt, k))
    return ranks, used / sum(m["w"].size for m in mats)


def perplexity(weights):
    m2 = onnx.ModelProto()
    m2.CopyFrom(model)
    for t in m2.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    s = ort.InferenceSession(m2.SerializeToString(), providers=["CPUExecutionProvider"])
    d = np.load(lm / "eval.npz")
    nll, n = 0.0, 0
    for b in range(0, len(d["input_ids"]), 8):
        feed = {k: d[k][b:b + 8] for k in ("input_ids", "attention_mask", "position_ids")}
        lg = s.run(None, feed)[0][:, :-1].astype(np.float64)
        tgt = feed["input_ids"][:, 1:]
        keep = (feed["attention_mask"][:, 1:] != 0) & (feed["attention_mask"][:, :-1] != 0)
        lg -= lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        nl = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
        nll += nl[keep].sum()
        n += keep.sum()
    return float(np.exp(nll / n))


print("| method | fraction | stored | held-out perplexity |")
print("|---|---|---|---|")
print(f"| original | 1.00 | 1.00 | {perplexity({}):.2f} |")
for f in a.fractions:
    ranks = uniform(f)
    stored = sum(min(ranks[m['name']] * sum(m['w'].shape), m['w'].size) for m in mats) / sum(m["w"].size for m in mats)
    for label, plain in (("plain SVD, uniform rank", True), ("activation-aware SVD, uniform rank", False)):
        ppl = perplexity({m["name"]: reconstruct(m, ranks[m["name"]], plain) for m in mats})
        print(f"| {label} | {f:.2f} | {stored:.3f} | {ppl:.2f} |")
    ranks, stored = global_alloc(f)
    ppl = perplexity({m["name"]: reconstruct(m, ranks[m["name"]], False) for m in mats})
    print(f"| activation-aware SVD, global allocation | {f:.2f} | {stored:.3f} | {ppl:.2f} |")
    sys.stdout.flush()

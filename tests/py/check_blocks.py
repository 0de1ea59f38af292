"""Numerical confirmation of detected MoE blocks, independent of smoe-opt's own code.

For each block description (JSON from smoe_opt::moe::detect), the block's input X and output Y
are exposed as graph outputs and computed by onnxruntime on the io.npz inputs; Y is recomputed
with numpy from X and the described weights (router, top-k, renormalisation, capacity,
experts, activation, biases, shared experts) and the two compared.
Usage: check_blocks.py MODEL BLOCKS.json IO.npz [--rtol R]. Prints JSON, exit 0 when all match."""
import argparse, json, sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("blocks")
ap.add_argument("io")
ap.add_argument("--rtol", type=float, default=1e-4)
a = ap.parse_args()

m = onnx.load(a.model)
blocks = json.load(open(a.blocks))
consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
for n in m.graph.node:
    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
        consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
have = {o.name for o in m.graph.output}
for b in blocks:
    for v in (b["input"], b["output"]):
        if v not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(v))
            have.add(v)
sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
io = np.load(a.io)
feed = {i.name: io[i.name] for i in sess.get_inputs()}
names = [o.name for o in sess.get_outputs()]
vals = dict(zip(names, sess.run(None, feed)))


def weight(r):
    t = consts[r["tensor"]].astype(np.float64)
    if r.get("expert") is not None:
        t = t[r["expert"]]
    if r["transpose"]:
        t = t.T
    if r.get("rows"):
        t = t[r["rows"]["start"]::r["rows"]["step"]]
    out, inp = r["shape"]
    assert t.shape[1] == inp, (t.shape, r)
    return t[:out]


def bias(r):
    if r is None:
        return 0.0
    t = consts[r["tensor"]].astype(np.float64).reshape(-1) if r.get("expert") is None else consts[r["tensor"]][r["expert"]].astype(np.float64)
    if r.get("rows"):
        t = t[r["rows"]["start"]::r["rows"]["step"]]
    return t[: r["len"]]


def act(x, kind):
    if kind == "silu":
        return x / (1 + np.exp(-x))
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "gelu":
        from math import erf
        return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    if kind == "gelu-tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    if kind == "identity":
        return x
    raise ValueError(kind)


def ffn(f, x):
    up = x @ weight(f["up"]).T + bias(f["up_bias"])
    if f["gate"] is not None:
        h = act(x @ weight(f["gate"]).T + bias(f["gate_bias"]), f["act"]) * up
    else:
        h = act(up, f["act"])
    return h @ weight(f["down"]).T + bias(f["down_bias"])


report = []
ok = True
for b in blocks:
    X = vals[b["input"]].astype(np.float64)
    Y = vals[b["output"]]
    r = b["router"]
    H = r["weight"]["shape"][1]
    lead = X.shape[:-1]
    x = X.reshape(-1, H)
    logits = x @ weight(r["weight"]).T + bias(r["bias"])
    k = r["top_k"]
    if r["scoring"] == "softmax":
        p = np.exp(logits - logits.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(p, idx, -1)
    elif r["scoring"] == "sigmoid":
        p = 1 / (1 + np.exp(-logits))
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(p, idx, -1)
    else:
        idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(logits, idx, -1)
        w = np.exp(w - w.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
    if r["renormalize"]:
        w = w / w.sum(-1, keepdims=True)
    keep = np.ones(idx.shape, bool)
    if r.get("capacity") is not None:
        # Switch: per sequence (leading axis), tokens in order; over-capacity tokens get 0.
        seqs = x.shape[0] // (lead[-1] if len(lead) > 1 else x.shape[0])
        S = x.shape[0] // seqs
        for s in range(seqs):
            counts = np.zeros(r["num_experts"], int)
            for t in range(s * S, (s + 1) * S):
                for j in range(k):
                    counts[idx[t, j]] += 1
                    keep[t, j] = counts[idx[t, j]] <= r["capacity"]
    experts = {e["index"]: e["ffn"] for e in b["experts"]}
    y = np.zeros_like(x)
    for e, f in experts.items():
        rows, slot = np.nonzero((idx == e) & keep)
        if len(rows):
            y[rows] += w[rows, slot][:, None] * ffn(f, x[rows])
    for s in b["shared"]:
        out = ffn(s["ffn"], x)
        if s["gate"] is not None:
            out = out / (1 + np.exp(-(x @ weight(s["gate"]).T)))
        y += out
    y = y.reshape(Y.shape)
    err = float(np.abs(y - Y).max() / (np.abs(Y).max() + 1e-12))
    good = err <= a.rtol
    ok &= good
    report.append({"block": b["name"], "rel_err": err, "ok": good})
print(json.dumps(report))
sys.exit(0 if ok else 1)

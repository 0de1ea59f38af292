"""Reference routing statistics with onnxruntime + numpy, independent of smoe-opt:
runs the model on an .npz (first axis = samples) with each block's input exposed, recomputes
logits, routing, expert outputs with numpy (moe_ref.py), excludes padding (attention_mask == 0),
and compares with smoe-opt's stats.json: counts exactly, floats within --rtol.
Usage: calib_ref.py MODEL BLOCKS.json DATA.npz STATS.json [--rtol R]"""
import argparse, json, os, sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, os.path.dirname(__file__))
from moe_ref import Block, constants  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("blocks")
ap.add_argument("data")
ap.add_argument("stats")
ap.add_argument("--rtol", type=float, default=1e-4)
a = ap.parse_args()

m = onnx.load(a.model)
blocks = json.load(open(a.blocks))
consts = constants(m)
for b in blocks:
    if b["input"] not in {o.name for o in m.graph.output}:
        m.graph.output.append(helper.make_empty_tensor_value_info(b["input"]))
sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
data = np.load(a.data)
feed = {i.name: data[i.name] for i in sess.get_inputs()}
vals = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
stats = {l["block"]: l for l in json.load(open(a.stats))["layers"]}


def close(x, y, what):
    x, y = np.asarray(x, float), np.asarray(y, float)
    err = np.abs(x - y).max() / (np.abs(y).max() + 1e-12)
    if err > a.rtol:
        raise SystemExit(f"{what}: rel err {err:.2e}\nsmoe-opt {x}\nreference {y}")


for b in blocks:
    blk = Block(b, consts)
    X = vals[b["input"]].astype(np.float64)
    H = b["router"]["weight"]["shape"][1]
    N = b["router"]["num_experts"]
    seq_len = X.shape[1] if X.ndim == 3 else X.shape[0]
    x = X.reshape(-1, H)
    keep = np.ones(len(x), bool)
    if "attention_mask" in feed and feed["attention_mask"].size == len(x):
        keep = feed["attention_mask"].reshape(-1) != 0
    z = blk.logits(x)
    idx, w, kept = blk.route(z, seq_len)
    routed = [[] for _ in range(N)]
    counts = np.zeros(N, int)
    wsum = np.zeros(N)
    reap = np.zeros(N)
    mean_out = np.zeros((N, H))
    outs = {e["index"]: blk.ffn(e["ffn"], x[keep]) for e in b["experts"]}
    for e, o in outs.items():
        mean_out[e] = o.sum(0) / keep.sum()
    kidx = np.nonzero(keep)[0]
    for j, t in enumerate(kidx):
        for s in range(idx.shape[1]):
            if kept[t, s]:
                e = idx[t, s]
                counts[e] += 1
                routed[e].append(x[t])
                wsum[e] += w[t, s]
                reap[e] += w[t, s] * np.linalg.norm(outs[e][j])
    zk = z[keep]
    g = zk.T @ zk
    cos = g / np.sqrt(np.outer(np.diag(g), np.diag(g)))
    st = stats[b["name"]]
    if st["tokens"] != int(keep.sum()):
        raise SystemExit(f"{b['name']}: tokens {st['tokens']} != {keep.sum()} (padding not excluded?)")
    if st["counts"] != counts.tolist():
        raise SystemExit(f"{b['name']}: counts {st['counts']} != {counts.tolist()}")
    nz = np.maximum(counts, 1)
    close(st["mean_weight"], wsum / nz, f"{b['name']} mean_weight")
    close(st["reap"], reap / nz, f"{b['name']} reap")
    close(st["logit_cosine"], cos, f"{b['name']} logit_cosine")
    side = np.load(os.path.join(os.path.dirname(a.stats), json.load(open(a.stats))["sidecar"]))
    close(side[f"{b['name']}.mean_output"], mean_out, f"{b['name']} mean_output")
    moments = side[f"{b['name']}.input_moments"]
    for e in range(N):
        if routed[e]:
            xe = np.array(routed[e])
            close(moments[e], xe.T @ xe / len(xe), f"{b['name']} input_moments[{e}]")
            samples = side[f"{b['name']}.samples.{e}"]
            # Every reservoir row is one of the expert's routed inputs (runtime rounding aside: the
            # batch shape changes the kernels' summation order, by --rtol in the model's precision).
            for row in samples:
                if np.abs(xe - row).max(axis=1).min() > a.rtol * (np.abs(xe).max() + 1e-12):
                    raise SystemExit(f"{b['name']}: reservoir row of expert {e} is not a routed input")
print(json.dumps({"ok": True, "blocks": len(blocks)}))

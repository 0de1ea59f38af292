"""Independent check of the per-block fidelity at the cuts: runs the original and the written
model in onnxruntime with the named tensors exposed as outputs (a rewritten block keeps its
output's name) and prints, per tensor, the relative L2 error and mean per-position cosine of
the written model's values against the original's on every sample of DATA.npz (padding rows
excluded for [batch, seq, H] and [batch*seq, H] tensors, as smoe-opt does).

usage: check_cuts.py ORIGINAL WRITTEN DATA.npz NAME [NAME...]
Prints JSON {NAME: {rel_l2, cosine}}."""
import json, sys

import numpy as np
import onnx
import onnxruntime as ort

orig, written, data, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
d = np.load(data)


def run(path):
    m = onnx.load(path)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {i.name: d[i.name] for i in s.get_inputs()}
    return dict(zip(names, s.run(names, feed)))


a, b = run(orig), run(written)
mask = d["attention_mask"] if "attention_mask" in d.files else None
res = {}
for n in names:
    ya, yb = a[n].astype(np.float64), b[n].astype(np.float64)
    ya, yb = ya.reshape(-1, ya.shape[-1]), yb.reshape(-1, yb.shape[-1])
    keep = np.ones(ya.shape[0], dtype=bool)
    if mask is not None and a[n].ndim >= 3 and a[n].shape[:2] == mask.shape:
        keep = np.repeat(mask.reshape(-1) != 0, ya.shape[0] // mask.size)
    elif mask is not None and a[n].ndim == 2 and a[n].shape[0] == mask.size:
        keep = mask.reshape(-1) != 0
    xa, xb = ya[keep], yb[keep]
    na, nb = np.linalg.norm(xa, axis=-1), np.linalg.norm(xb, axis=-1)
    res[n] = dict(
        rel_l2=float(np.sqrt(((xa - xb) ** 2).sum() / (xa ** 2).sum())),
        cosine=float(((xa * xb).sum(-1) / np.maximum(na * nb, 1e-300)).mean()),
    )
print(json.dumps(res))

"""Independent check of a reduced model: onnx.checker (full, where the original passes it), onnxruntime runs it, and the
held-out relative L2 error against the original recomputed here.

usage: check_reduced.py ORIGINAL WRITTEN IO.npz START OUT.npz
Prints JSON {rel_l2, cosine, positions}; samples START.. are the held-out ones (padding rows
excluded for [batch, seq, ...] and [batch*seq, H] outputs, as smoe-opt does). Writes the written model's
onnxruntime outputs on all samples to OUT.npz (for the tract comparison)."""
import json, sys

import numpy as np
import onnx
import onnxruntime as ort

orig, written, io, start, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
wm = onnx.load(written)
try:
    onnx.checker.check_model(orig, full_check=True)
    original_valid = True
except onnx.checker.ValidationError:
    # onnxruntime-genai builder graphs put onnxruntime-only ops in the default domain: the
    # written model cannot be held to the checker either (onnxruntime runs both below).
    original_valid = False
if original_valid:
    onnx.checker.check_model(wm, full_check=True)
# No scatter reduction: onnxruntime's CPU ScatterND(reduction=add) races on duplicate indices.
for n in wm.graph.node:
    if n.op_type in ("ScatterND", "ScatterElements"):
        red = [a.s for a in n.attribute if a.name == "reduction"]
        assert red in ([], [b"none"]), f"{n.name}: reduction {red}"
d = np.load(io)
so = ort.SessionOptions()
so.log_severity_level = 3


def run(path):
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {i.name: d[i.name] for i in s.get_inputs()}
    return {o.name: v for o, v in zip(s.get_outputs(), s.run(None, feed))}


a, b = run(orig), run(written)
np.savez(out, **b)
num = den = cos = kl = 0.0
n = agree = lm_n = 0
mask = d["attention_mask"] if "attention_mask" in d.files else None
for name, ya in a.items():
    # Floating outputs only, and no present key/value caches (as smoe-opt's fidelity).
    if name not in b or not np.issubdtype(ya.dtype, np.floating) or name.startswith("present"):
        continue
    yb = b[name]
    if mask is not None and ya.ndim == 2 and ya.shape[0] == mask.size:
        # Token rows flattened, [batch*seq, H]: the mask's rows, flattened.
        seq = mask.shape[1]
        ya, yb = ya[start * seq:].astype(np.float64), yb[start * seq:].astype(np.float64)
        keep = mask[start:].reshape(-1) != 0
    else:
        ya, yb = ya[start:].astype(np.float64), yb[start:].astype(np.float64)
        keep = np.ones(ya.shape[:-1], dtype=bool)
    if mask is not None and ya.ndim >= 3 and ya.shape[1] == mask.shape[1]:
        keep = np.broadcast_to(mask[start:].reshape(mask[start:].shape + (1,) * (ya.ndim - 3)) != 0, ya.shape[:-1])
    xa, xb = ya[keep], yb[keep]
    num += ((xa - xb) ** 2).sum()
    den += (xa ** 2).sum()
    na, nb = np.linalg.norm(xa, axis=-1), np.linalg.norm(xb, axis=-1)
    cos += ((xa * xb).sum(-1) / np.maximum(na * nb, 1e-300)).sum()
    n += xa.shape[0]
    if "input_ids" in d.files and ya.ndim == 3:
        agree += int((xa.argmax(-1) == xb.argmax(-1)).sum())
        la = xa - xa.max(-1, keepdims=True)
        la -= np.log(np.exp(la).sum(-1, keepdims=True))
        lb = xb - xb.max(-1, keepdims=True)
        lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
        kl += float(np.maximum((np.exp(la) * (la - lb)).sum(-1), 0).sum())
        lm_n += xa.shape[0]
res = dict(rel_l2=float(np.sqrt(num / den)), cosine=float(cos / n), positions=n)
if lm_n:
    res.update(top1_agreement=agree / lm_n, kl=kl / lm_n)
print(json.dumps(res))

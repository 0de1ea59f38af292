"""Runs two models on the same generated inputs at several batch/sequence shapes in
onnxruntime and compares their outputs. Inputs are made from the first model's declared
inputs: input_ids random in [0, vocab), attention_mask ones (last row right-padded),
position_ids arange, float inputs standard normal. Prints JSON; exit 0 when all agree.
Usage: compare_models.py A B [--rtol R] [--shapes 1x5,3x11]"""
import argparse, json, sys

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("a")
ap.add_argument("b")
ap.add_argument("--rtol", type=float, default=1e-5)
ap.add_argument("--shapes", default="1x5,3x11,2x1")
args = ap.parse_args()
sa = ort.InferenceSession(args.a, providers=["CPUExecutionProvider"])
sb = ort.InferenceSession(args.b, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
res = []
ok = True
for shp in args.shapes.split(","):
    b, s = map(int, shp.split("x"))
    feed = {}
    for i in sa.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = rng.integers(0, 256, (b, s), dtype=np.int64)
        elif i.name == "attention_mask":
            m = np.ones((b, s), np.int64)
            if b > 1 and s > 2:
                m[-1, -2:] = 0
            feed[i.name] = m
        elif i.name == "position_ids":
            feed[i.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        else:
            dims = [d if isinstance(d, int) else None for d in i.shape]
            shape = [b * s if d is None else d for d in dims]
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    try:
        ya = sa.run(None, feed)
    except Exception as e:  # the original may be shape-specialised
        res.append({"shape": shp, "a_failed": str(e)[:200]})
        yb = sb.run(None, feed)
        continue
    yb = sb.run(None, feed)
    err = max(float(np.abs(p - q).max() / (np.abs(p).max() + 1e-12)) for p, q in zip(ya, yb))
    good = err <= args.rtol
    ok &= good
    res.append({"shape": shp, "rel_err": err, "ok": good})
print(json.dumps(res))
sys.exit(0 if ok else 1)

"""Runs two models on the same generated inputs at several batch/sequence shapes in
onnxruntime and compares their outputs. Inputs are made from the first model's declared
inputs: input_ids random in [0, vocab), attention_mask ones (last row right-padded),
position_ids arange, float inputs standard normal in the input's float type; past key/value
caches empty, shaped like those of --like IO.npz but for the batch. Prints JSON; exit 0 when all
agree. Usage: compare_models.py A B [--rtol R] [--shapes 1x5,3x11] [--like IO.npz]"""
import argparse, json, sys

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("a")
ap.add_argument("b")
ap.add_argument("--rtol", type=float, default=1e-5)
ap.add_argument("--shapes", default="1x5,3x11,2x1")
ap.add_argument("--like")
args = ap.parse_args()
like = np.load(args.like) if args.like else {}
import onnx  # noqa: E402
gqa = any(n.op_type == "GroupQueryAttention" for n in onnx.load(args.a, load_external_data=False).graph.node)
sa = ort.InferenceSession(args.a, providers=["CPUExecutionProvider"])
sb = ort.InferenceSession(args.b, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)


def valid(name, p, q, s):
    """A sliding-window present cache (GroupQueryAttention) is a buffer of the window's size of
    which a prompt of s tokens fills the first s positions; the rest is whatever the buffer held
    (it differs between two runs of the same model), so only the filled part is compared."""
    if name.startswith("present") and p.ndim == 4 and p.shape[2] > s:
        return p[:, :, :s], q[:, :, :s]
    return p, q


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
            # (GroupQueryAttention models refuse right padding in a prompt.)
            if b > 1 and s > 2 and not gqa:
                m[-1, -2:] = 0
            feed[i.name] = m
        elif i.name == "position_ids":
            feed[i.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        elif i.name.startswith("past") and i.name in like:
            feed[i.name] = np.zeros((b,) + like[i.name].shape[1:], like[i.name].dtype)
        else:
            dims = [d if isinstance(d, int) else None for d in i.shape]
            shape = [b * s if d is None else d for d in dims]
            dt = np.float16 if i.type == "tensor(float16)" else np.float32
            feed[i.name] = rng.standard_normal(shape).astype(dt)
    try:
        ya = sa.run(None, feed)
    except Exception as e:  # the original may be shape-specialised
        res.append({"shape": shp, "a_failed": str(e)[:200]})
        yb = sb.run(None, feed)
        continue
    yb = sb.run(None, feed)
    names = [o.name for o in sa.get_outputs()]
    err = max(float(np.abs(p.astype(np.float64) - q).max() / (np.abs(p).max() + 1e-12))
              for p, q in (valid(n, p, q, s) for n, p, q in zip(names, ya, yb)))
    good = err <= args.rtol
    ok &= good
    res.append({"shape": shp, "rel_err": err, "ok": good})
print(json.dumps(res))
sys.exit(0 if ok else 1)

"""Paired comparison of two language models' held-out next-token NLL, token by token, through
onnxruntime's Python API: the mean difference, its standard error and a bootstrap 95%
interval, i.e. whether one model's perplexity is really better than the other's on this
held-out set or within its sampling noise.

    .venv/bin/python benches/paired_nll.py HELDOUT.npz A.onnx B.onnx [--boot 2000]

HELDOUT.npz holds input_ids (and attention_mask) [samples, seq]; the models take them and
return [batch, seq, vocab] logits first (as `smoe-opt eval` scores them: positions whose token
and next token are real).
"""
import argparse

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("data")
ap.add_argument("a")
ap.add_argument("b")
ap.add_argument("--boot", type=int, default=2000)
ap.add_argument("--batch", type=int, default=8)
args = ap.parse_args()
data = dict(np.load(args.data))


def nll(path):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    out = []
    for i in range(0, len(data["input_ids"]), args.batch):
        feed = {k: data[k][i:i + args.batch] for k in names}
        logits = s.run(None, feed)[0].astype(np.float64)
        ids = feed["input_ids"]
        mask = feed.get("attention_mask", np.ones_like(ids))
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        target = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
        real = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
        out.append((lse[:, :-1] - target)[real])
    return np.concatenate(out)


a, b = nll(args.a), nll(args.b)
d = b - a
rng = np.random.default_rng(0)
boots = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(args.boot)])
lo, hi = np.percentile(boots, [2.5, 97.5])
print(f"predictions {len(d)}; perplexity A {np.exp(a.mean()):.3f}, B {np.exp(b.mean()):.3f}")
print(f"mean NLL difference B - A {d.mean():+.5f}, standard error {d.std(ddof=1) / np.sqrt(len(d)):.5f}, "
      f"bootstrap 95% interval [{lo:+.5f}, {hi:+.5f}]: "
      + ("not significant" if lo < 0 < hi else ("A better" if lo > 0 else "B better")))

"""Independent numpy implementation of MoE block semantics from a smoe-opt block
description (JSON): weights, routing (scoring, top-k, renormalisation, capacity), experts."""
from math import erf

import numpy as np
from onnx import numpy_helper


def constants(m):
    c = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            c[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    # Exporters alias identical weights through Identity nodes (TorchScript's dedup).
    for _ in range(4):
        for n in m.graph.node:
            if n.op_type == "Identity" and n.input[0] in c:
                c.setdefault(n.output[0], c[n.input[0]])
    return c


class Block:
    def __init__(self, desc, consts):
        self.d, self.c = desc, consts

    def dequantized(self, r):
        """One expert's QMoE codes [out, in/pack] (uint8, 4-bit low nibble first) times its
        block scales, around the implicit zero point 2^(bits-1)."""
        q = r["quant"]
        codes = self.c[r["tensor"]][r["expert"]]
        if q["bits"] == 4:
            codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)
        vals = codes.astype(np.float64) - 2 ** (q["bits"] - 1)
        s = self.c[q["scales"]][r["expert"]].astype(np.float64)
        if s.ndim == 1:
            s = s[:, None]
        width = q["block"] or vals.shape[1]
        return vals * np.repeat(s, width, axis=1)[:, : vals.shape[1]]

    def weight(self, r):
        if r.get("quant"):
            t = self.dequantized(r)
        else:
            t = self.c[r["tensor"]].astype(np.float64)
        if r.get("expert") is not None and not r.get("quant"):
            t = t[r["expert"]]
        if r["transpose"]:
            t = t.T
        if r.get("rows"):
            t = t[r["rows"]["start"]::r["rows"]["step"]]
        out, inp = r["shape"]
        assert t.shape[1] == inp, (t.shape, r)
        return t[:out]

    def bias(self, r):
        if r is None:
            return 0.0
        t = self.c[r["tensor"]].astype(np.float64)
        t = t.reshape(-1) if r.get("expert") is None else t[r["expert"]]
        if r.get("rows"):
            t = t[r["rows"]["start"]::r["rows"]["step"]]
        return t[: r["len"]]

    @staticmethod
    def act(x, kind):
        if kind == "silu":
            return x / (1 + np.exp(-x))
        if kind == "relu":
            return np.maximum(x, 0)
        if kind == "gelu":
            return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
        if kind == "gelu-tanh":
            return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
        if kind == "identity":
            return x
        raise ValueError(kind)

    def ffn(self, f, x):
        up = x @ self.weight(f["up"]).T + self.bias(f["up_bias"])
        clamped = f["act"].get("swiglu-clamped") if isinstance(f["act"], dict) else None
        if clamped is not None:
            # gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit), g*sigmoid(alpha*g)*(u+beta)
            g = x @ self.weight(f["gate"]).T + self.bias(f["gate_bias"])
            lim = clamped["limit"]
            if lim is not None:
                g, up = np.minimum(g, lim), np.clip(up, -lim, lim)
            h = g / (1 + np.exp(-clamped["alpha"] * g)) * (up + clamped["beta"])
        elif f["gate"] is not None:
            h = self.act(x @ self.weight(f["gate"]).T + self.bias(f["gate_bias"]), f["act"]) * up
        else:
            h = self.act(up, f["act"])
        return h @ self.weight(f["down"]).T + self.bias(f["down_bias"])

    def logits(self, x):
        r = self.d["router"]
        return x @ self.weight(r["weight"]).T + self.bias(r["bias"])

    def route(self, logits, seq_len):
        """(idx [T,k], w [T,k], kept [T,k]) exactly as the block routes."""
        r = self.d["router"]
        k = r["top_k"]
        if r["scoring"] == "sparsemixer":
            return self.sparsemixer(logits, r["jitter_eps"])
        if r["scoring"] == "softmax":
            p = np.exp(logits - logits.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        elif r["scoring"] == "sigmoid":
            p = 1 / (1 + np.exp(-logits))
        else:
            p = logits
        # DeepSeek-V3: experts are chosen by the scores plus a selection bias, among the best
        # groups (a group scores the sum of its two best); the weights are the unbiased scores.
        choice = p + (self.bias(r["selection_bias"]) if r.get("selection_bias") else 0.0)
        if r.get("groups"):
            g, top = r["groups"]["count"], r["groups"]["top"]
            c3 = choice.reshape(len(choice), g, -1)
            gs = np.sort(c3, axis=-1)[:, :, ::-1][:, :, :2].sum(-1)
            keep = np.argsort(-gs, axis=-1, kind="stable")[:, :top]
            mask = np.zeros(gs.shape, bool)
            np.put_along_axis(mask, keep, True, -1)
            choice = np.where(np.repeat(mask, c3.shape[2], -1), choice, -np.inf)
        idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(p, idx, -1)
        if r["scoring"] == "softmax-after-topk":
            w = np.exp(w - w.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
        elif r["renormalize"]:
            w = w / w.sum(-1, keepdims=True)
        w = w * r.get("scale", 1.0)
        kept = np.ones(idx.shape, bool)
        if r.get("capacity") is not None:
            for s0 in range(0, len(idx), seq_len):
                used = np.zeros(r["num_experts"], int)
                for t in range(s0, min(s0 + seq_len, len(idx))):
                    for j in range(k):
                        used[idx[t, j]] += 1
                        if used[idx[t, j]] > r["capacity"]:
                            kept[t, j] = False
        w = np.where(kept, w, 0.0)
        return idx, w, kept

    @staticmethod
    def sparsemixer(z, eps):
        """PhiMoE (transformers' `sparsemixer`, eval): the best logit, weighted by the softmax
        over the logits whose gap to it, relative to max(|z_j|, best), is at most 2·eps; then the
        best of the others, the same way among the others."""
        t = np.arange(len(z))
        i1 = z.argmax(-1)
        m1 = z[t, i1][:, None]
        g1 = np.where((m1 - z) / np.maximum(np.abs(z), m1) > 2 * eps, -np.inf, z)
        p1 = np.exp(g1 - m1); p1 /= p1.sum(-1, keepdims=True)
        z2 = z.copy(); z2[t, i1] = -np.inf
        i2 = z2.argmax(-1)
        m2 = z2[t, i2][:, None]
        g2 = np.where((m2 - z) / np.maximum(np.abs(z), m2) > 2 * eps, -np.inf, z2)
        p2 = np.exp(g2 - m2); p2 /= p2.sum(-1, keepdims=True)
        idx = np.stack([i1, i2], -1)
        w = np.stack([p1[t, i1], p2[t, i2]], -1)
        return idx, w, np.ones(idx.shape, bool)

    def forward(self, x, seq_len):
        idx, w, kept = self.route(self.logits(x), seq_len)
        y = np.zeros_like(x)
        for e in self.d["experts"]:
            rows, slot = np.nonzero((idx == e["index"]) & kept)
            if len(rows):
                y[rows] += w[rows, slot][:, None] * self.ffn(e["ffn"], x[rows])
        for s in self.d["shared"]:
            out = self.ffn(s["ffn"], x)
            if s["gate"] is not None:
                out = out / (1 + np.exp(-(x @ self.weight(s["gate"]).T)))
            y += out
        return y

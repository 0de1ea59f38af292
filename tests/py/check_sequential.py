"""Independent check of the sequential pipeline on one MoE block: each written model's block
output against the ORIGINAL model's output of the same block on the same tokens (held-out
data), so that the drift of the block's inputs (earlier layers rewritten) and the block's own
error both count. The sequential fit targets exactly this, the one-shot fit does not.

usage: check_sequential.py ORIGINAL ONE_SHOT SEQUENTIAL DATA.npz BLOCK_OUTPUT
Prints JSON {one_shot, sequential}: relative squared error sum((y - y0)^2) / sum(y0^2) over
the tokens the attention mask keeps (all tokens without a mask)."""
import json, os, sys, tempfile

import numpy as np
import onnx
import onnxruntime as ort

orig, one, seq, data, bout = sys.argv[1:6]
d = np.load(data)
so = ort.SessionOptions()
so.log_severity_level = 3
tmp = tempfile.mkdtemp()


def tap(path, tag):
    """The block output of the model at `path`, run in onnxruntime on the data."""
    m = onnx.load(path)
    if bout not in {o.name for o in m.graph.output}:
        m.graph.output.append(onnx.helper.make_tensor_value_info(bout, onnx.TensorProto.FLOAT, None))
    p = os.path.join(tmp, tag + ".onnx")
    onnx.save(m, p)
    s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    feed = {i.name: d[i.name] for i in s.get_inputs()}
    names = [o.name for o in s.get_outputs()]
    y = s.run(None, feed)[names.index(bout)].astype(np.float64)
    return y.reshape(-1, y.shape[-1])


y0 = tap(orig, "orig")
keep = np.ones(y0.shape[0], bool)
if "attention_mask" in d.files and d["attention_mask"].size == y0.shape[0]:
    keep = d["attention_mask"].reshape(-1) != 0
y0 = y0[keep]


def err(path, tag):
    y = tap(path, tag)[keep]
    return float(((y - y0) ** 2).sum() / (y0 ** 2).sum())


print(json.dumps({"one_shot": err(one, "one"), "sequential": err(seq, "seq")}))

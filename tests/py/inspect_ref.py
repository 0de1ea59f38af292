"""Reference summary of a model computed with the onnx package (never loads external data),
to compare with `smoe-opt inspect --json`."""
import collections, json, sys

import numpy as np
import onnx
from onnx import helper

m = onnx.load(sys.argv[1], load_external_data=False)
g = m.graph
inits = {t.name for t in g.initializer}


def dims(v):
    t = v.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in t.shape.dim]


def dtype_name(code):
    return onnx.TensorProto.DataType.Name(code).lower()


ops = collections.Counter()
for n in g.node:
    ops[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"] += 1
by = {}
total = 0
for t in g.initializer:
    nbytes = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    e = by.setdefault(dtype_name(t.data_type), {"count": 0, "bytes": 0})
    e["count"] += 1
    e["bytes"] += nbytes
    total += nbytes
print(json.dumps({
    "ir_version": m.ir_version,
    "opsets": [{"domain": o.domain, "version": o.version} for o in m.opset_import],
    "inputs": [{"name": v.name, "dtype": dtype_name(v.type.tensor_type.elem_type), "shape": dims(v)}
               for v in g.input if v.name not in inits],
    "outputs": [{"name": v.name, "dtype": dtype_name(v.type.tensor_type.elem_type), "shape": dims(v)}
                for v in g.output],
    "nodes": len(g.node),
    "ops": dict(ops),
    "initializers": {"count": len(g.initializer), "bytes": total, "by_dtype": by},
}))

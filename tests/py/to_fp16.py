"""Writes a float16 copy of a float32 model (initializers, Constant tensors, graph I/O and
Cast-to-float targets), for smoe-opt's refusal test. usage: to_fp16.py IN OUT"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

m = onnx.load(sys.argv[1])
g = m.graph
for i, t in enumerate(g.initializer):
    if t.data_type == TensorProto.FLOAT:
        g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
for n in g.node:
    for a in n.attribute:
        if n.op_type == "Constant" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.FLOAT16
for v in list(g.input) + list(g.output):
    if v.type.tensor_type.elem_type == TensorProto.FLOAT:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
del g.value_info[:]
onnx.save(m, sys.argv[2])

"""Independent check of a model written by smoe-opt: onnx.checker (full) and onnxruntime outputs
against the reference outputs in an io.npz. Prints one JSON line; exit 0 when everything holds."""
import argparse, json, sys

import numpy as np
import onnx
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("io")
ap.add_argument("--rtol", type=float, default=1e-5)
ap.add_argument("--no-checker", action="store_true")
ap.add_argument("--exact", action="store_true",
                help="also require the outputs of --original run in the same onnxruntime, bit for "
                "bit (a byte-exact rewrite computes exactly what the original computes; the io.npz "
                "reference, made on another machine, may differ in the last bits with the CPU's kernels)")
ap.add_argument("--original", help="the model it was made from: when that one fails onnx.checker itself "
                "(onnxruntime-genai builder graphs put onnxruntime-only ops such as SimplifiedLayerNormalization "
                "in the default domain), the written model is not held to the checker either")
a = ap.parse_args()

checker = not a.no_checker
if checker and a.original:
    try:
        onnx.checker.check_model(a.original, full_check=True)
    except onnx.checker.ValidationError:
        checker = False
if checker:
    # Path form, so external data is checked too.
    onnx.checker.check_model(a.model, full_check=True)
io = np.load(a.io)
sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
feed = {i.name: io[i.name] for i in sess.get_inputs()}
outs = sess.run(None, feed)
worst = 0.0
seq = io["input_ids"].shape[1] if "input_ids" in io.files else None
for o, v in zip(sess.get_outputs(), outs):
    ref = io[o.name]
    if seq is not None and o.name.startswith("present") and v.ndim == 4 and v.shape[2] > seq:
        # A sliding-window present cache: a prompt fills its first `seq` positions, the rest
        # is whatever the buffer held (it differs between two runs of the same model).
        v, ref = v[:, :, :seq], ref[:, :, :seq]
    if ref.shape != v.shape:
        print(json.dumps({"ok": False, "output": o.name, "reason": f"shape {v.shape} != {ref.shape}"}))
        sys.exit(1)
    err = float(np.abs(v.astype(np.float64) - ref).max() / (np.abs(ref).max() + 1e-12))
    worst = max(worst, err)
ok = worst <= a.rtol
res = {"ok": ok, "max_rel_err": worst}
if a.exact:
    base = ort.InferenceSession(a.original, providers=["CPUExecutionProvider"])
    want = base.run([o.name for o in sess.get_outputs()], feed)
    def cut(o, v):
        # The unfilled part of a sliding-window present cache differs between two runs.
        if seq is not None and o.name.startswith("present") and v.ndim == 4 and v.shape[2] > seq:
            return v[:, :, :seq]
        return v
    same = all(np.array_equal(cut(o, x), cut(o, y), equal_nan=True)
               for o, x, y in zip(sess.get_outputs(), outs, want))
    res["same_as_original"] = same
    res["ok"] = ok and same
print(json.dumps(res))
sys.exit(0 if ok else 1)

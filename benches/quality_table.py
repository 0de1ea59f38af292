"""Quality of the reduced trained MoE language model (testdata/lm) against kept experts.

For each method and kept fraction: smoe-opt merges/prunes with statistics from
testdata/lm/calib.txt (training split), `smoe-opt eval` scores the written model on the
held-out topics (testdata/lm/eval.npz, never used to fit), and the report's fidelity
(same held-out set) gives top-1 agreement with the original. Writes the markdown table
between the QUALITY markers of BENCHMARKS.md (and prints it).

    python3 benches/quality_table.py [--bin target/release/smoe-opt] [--no-write]
"""
import argparse, json, os, re, subprocess, tempfile

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--no-write", action="store_true")
a = ap.parse_args()
lm = "testdata/lm"
tmp = tempfile.mkdtemp()
calib = ["--calib-text", f"{lm}/calib.txt", "--tokenizer", f"{lm}/tokenizer.json", "--seq-len", "128"]


def evaluate(model):
    p = subprocess.run([a.bin, "eval", model, "--data", f"{lm}/eval.npz", "--json"], check=True,
                       capture_output=True, text=True)
    return json.loads(p.stdout)


base = evaluate(f"{lm}/model.onnx")
truth = json.load(open(f"{lm}/truth.json"))
rows = [f"| original (8 experts) | 100% | {base['perplexity']:.2f} | {base['top1']:.3f} | 1.000 | "
        f"{os.path.getsize(lm + '/model.onnx') / 1e6:.2f} |"]
for keep in ("0.75", "0.5", "0.25"):
    for method in ("m-smoe", "hc-smoe", "prune-frequency", "prune-reap", "average"):
        out = os.path.join(tmp, f"{method}_{keep}.onnx")
        rep = os.path.join(tmp, f"{method}_{keep}.json")
        subprocess.run([a.bin, f"{lm}/model.onnx", "-o", out, "--method", method, "--keep", keep,
                        "--eval-data", f"{lm}/eval.npz", "--report", rep, "-q"] + calib, check=True)
        r = json.load(open(rep))
        e = evaluate(out)
        experts = "/".join(str(l["experts_after"]) for l in r["layers"])
        rows.append(f"| {method} (experts {experts}) | {float(keep):.0%} | {e['perplexity']:.2f} | {e['top1']:.3f} | "
                    f"{r['fidelity']['top1_agreement']:.3f} | {r['bytes_after'] / 1e6:.2f} |")
table = "\n".join([
    f"Model: testdata/lm ({truth['layers']} MoE layers x {truth['experts']} experts, top-{truth['top_k']}, "
    f"hidden {truth['hidden']}, intermediate {truth['intermediate']}; trained {truth['steps']} steps on CPython's "
    f"pydoc topics). Held-out: {base['predictions']} next-token predictions from topics never seen in "
    "training or calibration. Calibration: testdata/lm/calib.txt (training split), 128-token windows. "
    "No fine-tuning after merging (the paper's numbers are after distillation). "
    "`experts a/b` = experts kept per layer (m-smoe and average use the adaptive per-layer budget).",
    "",
    "| method | kept | held-out perplexity | top-1 accuracy | top-1 agreement with original | file MB |",
    "|---|---|---|---|---|---|",
] + rows)
print(table)
if not a.no_write:
    path = "BENCHMARKS.md"
    s = open(path).read()
    begin, end = "<!-- QUALITY BEGIN (benches/quality_table.py) -->", "<!-- QUALITY END -->"
    block = f"{begin}\n{table}\n{end}"
    if begin in s:
        s = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, s, flags=re.S)
    else:
        s += f"\n## Quality of reduced models (trained MoE LM)\n\n{block}\n"
    open(path, "w").write(s)

"""Quality of the reduced trained MoE language models (testdata/lm, testdata/lm_upcycled) at equal
stored expert bytes: merging/pruning (`--keep F`) against compression (`--target-size F`, every
`--compress` family and the auto plan).

For each method and fraction: smoe-opt reduces with statistics from calib.txt (training split), `smoe-opt eval` scores the written model on the
held-out topics (testdata/lm/eval.npz, never used to fit), and the report's fidelity
(same held-out set) gives top-1 agreement with the original. Writes the markdown table
between the QUALITY markers of BENCHMARKS.md (and prints it).

    python3 benches/quality_table.py [--bin target/release/smoe-opt] [--lm testdata/lm] [--no-write]
"""
import argparse, json, os, re, subprocess, tempfile

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/smoe-opt")
ap.add_argument("--no-write", action="store_true")
ap.add_argument("--lm", default="testdata/lm")
a = ap.parse_args()
lm = a.lm
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
    runs = [(m, ["--method", m, "--keep", keep]) for m in
            ("m-smoe", "hc-smoe", "prune-frequency", "prune-reap", "average")]
    runs += [(f"compress {c}", ["--target-size", keep, "--compress", c]) for c in
             ("low-rank", "base-delta", "neurons", "auto")]
    # The auto plan fitted one-shot and layer by layer (`--pipeline`; the default, auto,
    # writes whichever measured better on the calibration samples that choose plans).
    runs += [(f"compress auto, {p}", ["--target-size", keep, "--compress", "auto", "--pipeline", p])
             for p in ("one-shot", "sequential")]
    best = None
    for label, flags in runs:
        tag = label.replace(" ", "_")
        out = os.path.join(tmp, f"{tag}_{keep}.onnx")
        rep = os.path.join(tmp, f"{tag}_{keep}.json")
        p = subprocess.run([a.bin, f"{lm}/model.onnx", "-o", out, "--eval-data", f"{lm}/eval.npz",
                            "--report", rep, "-q"] + flags + calib, capture_output=True, text=True)
        if p.returncode != 0:
            rows.append(f"| {label} | {float(keep):.0%} | failed: {p.stderr.strip()[:80]} | | | |")
            continue
        r = json.load(open(rep))
        e = evaluate(out)
        if "compression" in r:
            c = r["compression"]
            kinds = sorted({l["compression"]["family"] for l in r["layers"]})
            desc = f"{label} ({', '.join(kinds)}; {c['fraction']:.0%} of expert bytes)"
            if c.get("chosen_by"):
                desc = f"{label} (chose: {c['plan']}; {', '.join(kinds)}; {c['fraction']:.0%})"
            if c.get("pipeline") == "sequential" and "sequential" not in label:
                desc = desc.replace(label, f"{label} [sequential fit]", 1)
        else:
            experts = "/".join(str(l["experts_after"]) for l in r["layers"])
            desc = f"{label} (experts {experts})"
        rows.append(f"| {desc} | {float(keep):.0%} | {e['perplexity']:.2f} | {e['top1']:.3f} | "
                    f"{r['fidelity']['top1_agreement']:.3f} | {r['bytes_after'] / 1e6:.2f} |")
table = "\n".join([
    f"Model: {lm} ({'upcycled from a dense FFN, ' if truth.get('upcycled') else ''}{truth['layers']} MoE layers x {truth['experts']} experts, top-{truth['top_k']}, "
    f"hidden {truth['hidden']}, intermediate {truth['intermediate']}; trained {truth['steps']} steps on CPython's "
    f"pydoc topics). Held-out: {base['predictions']} next-token predictions from topics never seen in "
    "training or calibration. Calibration: testdata/lm/calib.txt (training split), 128-token windows. "
    "No fine-tuning after merging (the paper's numbers are after distillation). "
    "`experts a/b` = experts kept per layer (m-smoe and average use the adaptive per-layer budget). "
    "`compress F` = `--target-size` with `--compress F`: the fraction is of the routed experts' bytes, "
    "the same as the kept fraction of the merge/prune rows.",
    "",
    "| method | kept | held-out perplexity | top-1 accuracy | top-1 agreement with original | file MB |",
    "|---|---|---|---|---|---|",
] + rows)
print(table)
if not a.no_write:
    path = "BENCHMARKS.md"
    s = open(path).read()
    key = os.path.basename(os.path.normpath(lm))
    suffix = "" if key == "lm" else f" {key}"
    begin, end = f"<!-- QUALITY{suffix} BEGIN (benches/quality_table.py) -->", f"<!-- QUALITY{suffix} END -->"
    block = f"{begin}\n{table}\n{end}"
    if begin in s:
        s = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, s, flags=re.S)
    else:
        s += f"\n### {lm}\n\n{block}\n"
    open(path, "w").write(s)

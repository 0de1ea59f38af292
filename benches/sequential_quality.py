"""Held-out perplexity of the fixed compression families fitted one-shot and layer by layer
(`--pipeline sequential`, which plans one layer at a time: spectra per layer, one global
allocation, each layer refitted on the rewritten earlier layers and written as it goes), on
the two trained test LMs at 50% and 25% of the routed-expert bytes. Prints a markdown table.

    python3 benches/sequential_quality.py [--bin target/release/smoe-opt]
"""
import argparse, json, subprocess, tempfile

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/smoe-opt")
a = ap.parse_args()
tmp = tempfile.mkdtemp()


def ppl(model, lm):
    p = subprocess.run([a.bin, "eval", model, "--data", f"{lm}/eval.npz", "--json"], check=True,
                       capture_output=True, text=True)
    return json.loads(p.stdout)["perplexity"]


print("| model | family | target | one-shot | sequential (one layer at a time) |")
print("|---|---|---|---|---|")
for lm in ("testdata/lm", "testdata/lm_upcycled"):
    calib = ["--calib-text", f"{lm}/calib.txt", "--tokenizer", f"{lm}/tokenizer.json", "--seq-len", "128"]
    for family in ("low-rank", "base-delta", "neurons"):
        for target in ("0.5", "0.25"):
            cells = []
            for pipeline in ("one-shot", "sequential"):
                out = f"{tmp}/{lm.replace('/', '_')}_{family}_{target}_{pipeline}.onnx"
                r = subprocess.run([a.bin, f"{lm}/model.onnx", "-o", out, *calib, "--target-size", target,
                                    "--compress", family, "--pipeline", pipeline, "-q"],
                                   capture_output=True, text=True)
                cells.append(f"{ppl(out, lm):.2f}" if r.returncode == 0 else
                             f"failed: {r.stderr.strip().splitlines()[-1][:60]}")
            print(f"| {lm.split('/')[-1]} | {family} | {target} | {cells[0]} | {cells[1]} |", flush=True)

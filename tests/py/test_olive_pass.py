"""The SmoeOpt Olive pass, in a venv with olive-ai (and torch) and the smoe_opt package:

- examples/olive/workflow.json (SmoeOpt between the ONNX model and Olive's dynamic int8
  quantisation) runs through ``python -m smoe_opt.olive``; the SmoeOpt step writes the same
  bytes and report as the ``smoe-opt`` binary given the pass's options as flags; the final
  model is quantised, runs in onnxruntime, and stays close to the SmoeOpt model;
- examples/olive/workflow_data_config.json runs through Olive's own ``olive run
  --package-config``, calibrating from an Olive data config: the same bytes as the binary
  given the same samples as an .npz;
- ``save_as_external_data`` gives a model folder (model + weights file) that loads;
- a bad option fails the workflow with smoe-opt's message and no output model.

Paths in the example workflows are relative to the repository; this test takes them from
REPO_ROOT and writes under WORK_DIR, leaving the pass options as the examples have them.

usage: test_olive_pass.py SMOE_OPT_BINARY REPO_ROOT WORK_DIR
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from reports import comparable

BIN, ROOT, WORK = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
PY = sys.executable
OLIVE = str(Path(PY).with_name("olive"))
LM = ROOT / "testdata/lm"
PATH_OPTIONS = ("calib", "calib_text", "tokenizer", "stats", "eval_data")


def run(args, ok=True):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=WORK)
    out = r.stdout + r.stderr
    assert (r.returncode == 0) == ok, (args, r.returncode, out[-4000:])
    return out


def rooted(example, out_dir, edit=None):
    """The example workflow with its inputs taken from the repository and its outputs in
    out_dir; ``edit`` may change the pass options (for the variants below)."""
    wf = json.loads((ROOT / "examples/olive" / example).read_text())
    wf["input_model"]["model_path"] = str(ROOT / wf["input_model"]["model_path"])
    for dc in wf.get("data_configs", []):
        dc["user_script"] = str(ROOT / dc["user_script"])
        params = dc["load_dataset_config"]["params"]
        params["path"] = str(ROOT / params["path"])
    for options in wf["passes"].values():
        for k in PATH_OPTIONS:
            if k in options:
                options[k] = str(ROOT / options[k])
    if edit:
        edit(wf)
    wf["output_dir"] = str(out_dir)
    wf["cache_dir"] = str(out_dir / "cache")
    path = WORK / f"{out_dir.name}.json"
    path.write_text(json.dumps(wf, indent=2))
    return wf, path


def smoe_options(wf):
    (options,) = [p for p in wf["passes"].values() if p["type"] == "SmoeOpt"]
    return {k: v for k, v in options.items() if k != "type"}


def as_flags(options):
    """The pass options as the binary's flags: snake_case option = --kebab-case flag."""
    flags = []
    for k, v in options.items():
        if k == "data_config":
            continue
        if k == "save_as_external_data":
            flags += ["--external-data"] if v else []
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def smoe_attributes(out_dir):
    cfg = json.loads((out_dir / "model_config.json").read_text())
    return cfg["config"]["model_attributes"]["smoe_opt"]


def op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def logits(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_example_workflow():
    out = WORK / "olive-out"
    wf, path = rooted("workflow.json", out)
    run([PY, "-m", "smoe_opt.olive", path])
    attrs = smoe_attributes(out)
    report = json.loads(Path(attrs["report"]).read_text())
    smoe_model = Path(report["output"])
    final = out / "model.onnx"
    assert final.exists() and smoe_model.exists(), (final, smoe_model)

    # The SmoeOpt step is the binary's run of the same options.
    cli_model, cli_report = WORK / "cli_example.onnx", WORK / "cli_example.json"
    run([BIN, LM / "model.onnx", "-o", cli_model, "--report", cli_report, "-q",
         *as_flags(smoe_options(wf))])
    assert cli_model.read_bytes() == smoe_model.read_bytes(), "SmoeOpt's model differs from the CLI's"
    assert comparable(json.loads(cli_report.read_text())) == comparable(report)
    assert attrs["bytes_after"] == report["bytes_after"] < report["bytes_before"]
    assert report["compression"]["fraction"] <= 0.5 + 1e-9, report["compression"]

    # Then Olive quantised it: integer MatMuls in the final model, none in SmoeOpt's.
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= op_types(final), op_types(final)
    assert "MatMulInteger" not in op_types(smoe_model)

    # onnxruntime on the held-out data, independent of smoe-opt's own measurement (tract).
    feeds = dict(np.load(LM / "eval.npz"))
    mask = feeds["attention_mask"].astype(bool)
    original, reduced, quantised = (
        log_softmax(logits(p, feeds))[mask] for p in (LM / "model.onnx", smoe_model, final)
    )
    top1 = float((original.argmax(-1) == reduced.argmax(-1)).mean())
    want = report["fidelity"]["top1_agreement"]
    # tract and onnxruntime differ by float rounding only: a few near-ties may flip.
    assert abs(top1 - want) < 0.01, (top1, want)
    q_top1 = float((reduced.argmax(-1) == quantised.argmax(-1)).mean())
    # Dynamic int8 quantisation moves the SmoeOpt model's predictions a little, not a lot.
    assert q_top1 > 0.8, q_top1
    ids = feeds["input_ids"]
    nxt = np.zeros_like(mask)
    nxt[:, :-1] = mask[:, :-1] & mask[:, 1:]
    target = ids[:, 1:][nxt[:, :-1]]
    rows = nxt[mask]

    def nll(lp):
        return float(-lp[rows][np.arange(len(target)), target].mean())

    print(
        f"example: top-1 vs original {top1:.3f} (report {want:.3f}); quantised vs SmoeOpt "
        f"{q_top1:.3f}; held-out NLL original {nll(original):.3f}, SmoeOpt {nll(reduced):.3f}, "
        f"quantised {nll(quantised):.3f}"
    )
    assert nll(original) < nll(reduced) and np.isfinite(nll(quantised))
    assert nll(quantised) < nll(reduced) + 0.5, (nll(quantised), nll(reduced))


def package_config():
    pc = WORK / "smoe_olive.json"
    run([PY, "-m", "smoe_opt.olive", "--write-package-config", pc])
    config = json.loads(pc.read_text())
    import olive.package_config as opc

    default = json.loads(Path(opc.OlivePackageConfig.get_default_config_path()).read_text())
    assert set(config["passes"]) == set(default["passes"]) | {"SmoeOpt"}
    return pc


def test_olive_cli_with_data_config():
    pc = package_config()
    out = WORK / "olive-out-merge"
    wf, path = rooted("workflow_data_config.json", out)
    run([OLIVE, "run", "--config", path, "--package-config", pc])
    # The data config's samples, written independently as the .npz the binary reads.
    params = wf["data_configs"][0]["load_dataset_config"]["params"]
    with np.load(params["path"]) as npz:
        arrays = {k: npz[k][: params["max_samples"]] for k in npz.files}
    calib = WORK / "calib16.npz"
    np.savez(calib, **arrays)
    cli_model = WORK / "cli_merge.onnx"
    run([BIN, LM / "model.onnx", "-o", cli_model, "-q", "--calib", calib,
         *as_flags(smoe_options(wf))])
    assert cli_model.read_bytes() == (out / "model.onnx").read_bytes()
    attrs = smoe_attributes(out)
    assert attrs["params_after"] < attrs["params_before"], attrs

    # The same with the weights in a file beside the model: Olive gets a model folder.
    def external(wf):
        for p in wf["passes"].values():
            p["save_as_external_data"] = True

    out = WORK / "olive-out-external"
    wf, path = rooted("workflow_data_config.json", out, external)
    run([OLIVE, "run", "--config", path, "--package-config", pc])
    report = json.loads(Path(smoe_attributes(out)["report"]).read_text())
    data = report["saved"]["data_path"]
    assert data and (out / Path(data).name).exists(), (data, list(out.iterdir()))
    # The same file name as Olive's output: the model names its weights file.
    (WORK / "cli_external").mkdir()
    cli_model = WORK / "cli_external" / "model.onnx"
    run([BIN, LM / "model.onnx", "-o", cli_model, "-q", "--calib", calib,
         *as_flags(smoe_options(wf))])
    assert cli_model.read_bytes() == (out / "model.onnx").read_bytes()
    cli_data = [f for f in cli_model.parent.iterdir() if f.name.endswith(".data")]
    assert [f.name for f in cli_data] == [Path(data).name], (cli_data, data)
    assert cli_data[0].read_bytes() == (out / Path(data).name).read_bytes()
    feeds = {k: v[:2] for k, v in arrays.items()}
    assert np.isfinite(logits(out / "model.onnx", feeds)).all()


def test_bad_option_fails_with_the_cli_message():
    pc = WORK / "smoe_olive.json"

    def bad(wf):
        for p in wf["passes"].values():
            p["keep"] = 1.5

    out = WORK / "olive-out-bad"
    wf, path = rooted("workflow_data_config.json", out, bad)
    got = run([OLIVE, "run", "--config", path, "--package-config", pc], ok=False)
    want = run([BIN, LM / "model.onnx", "-o", WORK / "never.onnx", "--keep", "1.5",
                "--calib", WORK / "calib16.npz"], ok=False)
    message = [l for l in want.splitlines() if l.strip()][0].removeprefix("error: ")
    assert message in got, (message, got[-3000:])
    # A user error stops the workflow (Olive re-raises ValueError; other pass failures are
    # logged and the run ends without an output model).
    assert "ValueError: SmoeOpt: " in got, got[-3000:]
    assert not (out / "model.onnx").exists()
    assert not (WORK / "never.onnx").exists()


if __name__ == "__main__":
    test_example_workflow()
    test_olive_cli_with_data_config()
    test_bad_option_fails_with_the_cli_message()
    print("ok")

"""The Python package `smoe_opt`, installed with `pip install .` into a fresh venv, against
the `smoe-opt` binary on the bundled LM: the three functions give what the CLI gives
(reports equal but for paths and timings, the same model bytes), numpy arrays calibrate like
the .npz they came from, failures raise the typed exceptions with the CLI's message, and log
records reach Python's logging.

usage: test_python_package.py SMOE_OPT_BINARY LM_DIR TMP_DIR
"""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import smoe_opt
from reports import comparable

BIN, LM, TMP = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
MODEL = LM / "model.onnx"
TEXT = ["--calib-text", str(LM / "calib.txt"), "--tokenizer", str(LM / "tokenizer.json"),
        "--seq-len", "64"]


def cli(*args, ok=True):
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert (r.returncode == 0) == ok, (args, r.returncode, r.stderr)
    return r


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_inspect():
    got = smoe_opt.inspect(MODEL)
    want = json.loads(cli("inspect", MODEL, "--json").stdout)
    assert got == want
    assert len(got["moe_blocks"]) == 2, got.keys()


def test_calibrate_and_logging():
    handler = Records()
    log = logging.getLogger("smoe_opt")
    log.addHandler(handler)
    # Progress lines become records of `smoe_opt.progress`; every drawn frame here (by
    # default one per 5 s, so a short step would log none).
    os.environ["SMOE_PROGRESS_LOG_SECS"] = "0"
    npz = LM / "eval.npz"
    try:
        # Levels are read at each call: WARNING gives no stage or progress records, then
        # INFO (set between two calls) gives both.
        log.setLevel(logging.WARNING)
        smoe_opt.calibrate(MODEL, npz)
        quiet = list(handler.records)
        log.setLevel(logging.INFO)
        stats = smoe_opt.calibrate(MODEL, text=LM / "calib.txt", tokenizer=LM / "tokenizer.json",
                                   seq_len=64)
    finally:
        log.removeHandler(handler)
        del os.environ["SMOE_PROGRESS_LOG_SECS"]
    messages = [(r.name, r.getMessage()) for r in handler.records]
    assert not quiet, [(r.name, r.getMessage()) for r in quiet]
    assert any(n.startswith("smoe_opt.") and "tokens" in m for n, m in messages), messages
    progress = [m for n, m in messages if n == "smoe_opt.progress"]
    assert any(re.search(r"\d+/\d+ samples", m) for m in progress), messages
    cli("calibrate", MODEL, *TEXT, "-o", TMP / "cli_stats.json")
    want = json.loads((TMP / "cli_stats.json").read_text())
    assert stats.layers == want["layers"]
    freqs = stats.frequencies()
    assert len(freqs) == 2 and all(abs(sum(f) - 1) < 1e-9 for f in freqs), freqs
    saved = stats.save(TMP / "kept_stats.json")
    assert saved.with_suffix(".npz").exists()

    # numpy arrays calibrate exactly like the .npz file they were read from.
    from_file = smoe_opt.calibrate(MODEL, npz)
    arrays = dict(np.load(npz))
    from_arrays = smoe_opt.calibrate(MODEL, arrays)
    assert from_arrays.layers == from_file.layers
    # One array is taken as `input_ids`: this LM also needs the mask and positions, so the
    # run is refused for the first input missing, not for input_ids.
    try:
        smoe_opt.calibrate(MODEL, arrays["input_ids"])
    except smoe_opt.UsageError as e:
        assert "no array 'attention_mask'" in str(e), str(e)
    else:
        raise AssertionError("token ids alone accepted for a model that needs a mask")
    return saved


def test_optimize(stats_path):
    flags = dict(target_size=0.5, compress="neurons", holdout=0.1)
    out = TMP / "py.onnx"
    report = smoe_opt.optimize(MODEL, out, text=LM / "calib.txt", tokenizer=LM / "tokenizer.json",
                               seq_len=64, report_html=TMP / "py.html", **flags)
    cli(MODEL, "-o", TMP / "cli.onnx", *TEXT, "--target-size", "0.5", "--compress", "neurons",
        "--holdout", "0.1", "--report", TMP / "cli.json")
    want = json.loads((TMP / "cli.json").read_text())
    assert comparable(report) == comparable(want)
    assert out.read_bytes() == (TMP / "cli.onnx").read_bytes()
    assert report["compression"]["fraction"] <= 0.5
    assert (TMP / "py.html").read_text().startswith("<!DOCTYPE html>")

    # Merging from saved statistics, and from numpy calibration arrays.
    merged = smoe_opt.optimize(MODEL, TMP / "stats.onnx", keep=0.5, stats=stats_path,
                               eval_data=LM / "eval.npz")
    assert all(l["experts_after"] < l["experts_before"] for l in merged["layers"])
    arrays = dict(np.load(LM / "eval.npz"))
    a = smoe_opt.optimize(MODEL, TMP / "a.onnx", keep=0.5, calib=arrays, holdout=0.25)
    b = smoe_opt.optimize(MODEL, TMP / "b.onnx", keep=0.5, calib=LM / "eval.npz", holdout=0.25)
    assert comparable(a) == comparable(b)


def test_errors():
    # Token ids outside the vocabulary: a DataError. Statistics whose router fingerprint is
    # not this model's: a StatsError. Both are UsageErrors (exit code 2).
    bad = dict(np.load(LM / "eval.npz"))
    bad["input_ids"] = np.full_like(bad["input_ids"], 10**6)
    np.savez(TMP / "bad_ids.npz", **bad)
    cli("calibrate", MODEL, "-o", TMP / "own.json", "--calib", LM / "eval.npz")
    stats = json.loads((TMP / "own.json").read_text())
    stats["layers"][0]["router_fingerprint"] = "0" * len(stats["layers"][0]["router_fingerprint"])
    (TMP / "other.json").write_text(json.dumps(stats))
    cases = [
        (smoe_opt.DataError,
         lambda: smoe_opt.optimize(MODEL, TMP / "e.onnx", keep=0.5, calib=TMP / "bad_ids.npz"),
         [MODEL, "-o", TMP / "e.onnx", "--keep", "0.5", "--calib", TMP / "bad_ids.npz"]),
        (smoe_opt.StatsError,
         lambda: smoe_opt.optimize(MODEL, TMP / "e.onnx", keep=0.5, stats=TMP / "other.json"),
         [MODEL, "-o", TMP / "e.onnx", "--keep", "0.5", "--stats", TMP / "other.json"]),
        (smoe_opt.InputError, lambda: smoe_opt.inspect(TMP / "missing.onnx"),
         ["inspect", TMP / "missing.onnx"]),
        (smoe_opt.UsageError, lambda: smoe_opt.optimize(MODEL, MODEL, keep=0.5, data_free=True),
         [MODEL, "-o", MODEL, "--keep", "0.5", "--data-free"]),
        (smoe_opt.InputError,
         lambda: smoe_opt.optimize(MODEL, TMP / "e.onnx", keep=0.5, calib=TMP / "missing.npz"),
         [MODEL, "-o", TMP / "e.onnx", "--keep", "0.5", "--calib", TMP / "missing.npz"]),
    ]
    for exc, call, args in cases:
        try:
            call()
        except exc as e:
            assert isinstance(e, smoe_opt.SmoeOptError)
            r = cli(*args, ok=False)
            # (warnings before the error are log records on the Python side)
            assert r.stderr.strip().splitlines()[-1] == f"error: {e}", (r.stderr, str(e))
            assert r.returncode == (2 if isinstance(e, smoe_opt.UsageError) else 1), args
        else:
            raise AssertionError(f"{args}: no {exc.__name__}")
    assert not (TMP / "e.onnx").exists()
    try:
        smoe_opt.optimize(MODEL, TMP / "k.onnx", keep=2.0, data_free=True)
    except smoe_opt.UsageError as e:
        assert "--keep" in str(e)
    else:
        raise AssertionError("keep=2.0 accepted")


if __name__ == "__main__":
    test_inspect()
    saved = test_calibrate_and_logging()
    test_optimize(saved)
    test_errors()
    print("ok")

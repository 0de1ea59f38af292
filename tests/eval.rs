//! `smoe-opt eval` against the training script's own held-out numbers (torch and
//! onnxruntime, testdata/lm{,_upcycled}/truth.json), and a reduced language model's fidelity report
//! (top-1 agreement, KL) recomputed independently in Python.
#![cfg(feature = "tract")]
mod common;
use common::*;
use serde_json::Value;

/// `smoe-opt eval` of `model` on the held-out windows (the same text for both LMs).
fn eval(model: &std::path::Path, runtime: &str) -> Value {
    let lm = root().join("testdata/lm");
    let o = bin()
        .arg("eval")
        .arg(model)
        .arg("--data")
        .arg(lm.join("eval.npz"))
        .args(["--json", "--runtime", runtime])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn perplexity_matches_the_training_scripts_reference() {
    for name in ["lm", "lm_upcycled"] {
        let lm = root().join("testdata").join(name);
        check_against_truth(&lm);
    }
}

fn check_against_truth(lm: &std::path::Path) {
    let truth: Value =
        serde_json::from_slice(&std::fs::read(lm.join("truth.json")).unwrap()).unwrap();
    let want = &truth["ort_heldout"];
    for runtime in ["tract", "ort"] {
        let got = eval(&lm.join("model.onnx"), runtime);
        let (p, w) = (
            got["perplexity"].as_f64().unwrap(),
            want["ppl"].as_f64().unwrap(),
        );
        // float32 logits, float64 accumulation on both sides: agreement to ~1e-6 relative.
        assert!((p - w).abs() < 1e-4 * w, "{runtime}: perplexity {p} vs {w}");
        let (t, tw) = (
            got["top1"].as_f64().unwrap(),
            want["top1"].as_f64().unwrap(),
        );
        assert!((t - tw).abs() < 1e-3, "{runtime}: top-1 {t} vs {tw}");
        assert_eq!(
            got["predictions"].as_u64().unwrap(),
            truth["torch_heldout"]["predictions"].as_u64().unwrap()
        );
    }
}

#[test]
fn reduced_lm_report_matches_an_independent_recomputation() {
    let Some(py) = python() else { return };
    let lm = root().join("testdata/lm");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lm.onnx");
    let rep = tmp.path().join("r.json");
    let o = bin()
        .arg(lm.join("model.onnx"))
        .arg("-o")
        .arg(&out)
        .args(["--keep", "0.75", "--seq-len", "128", "--calib-text"])
        .arg(lm.join("calib.txt"))
        .arg("--tokenizer")
        .arg(lm.join("tokenizer.json"))
        .arg("--eval-data")
        .arg(lm.join("eval.npz"))
        .arg("--report")
        .arg(&rep)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = fitting_file(Schema::Report, &rep);
    let f = &r["fidelity"];
    let c = run_py(
        &py,
        "check_reduced.py",
        &[
            lm.join("model.onnx").to_str().unwrap(),
            out.to_str().unwrap(),
            lm.join("eval.npz").to_str().unwrap(),
            "0",
            tmp.path().join("o.npz").to_str().unwrap(),
        ],
    );
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let v: Value = serde_json::from_slice(&c.stdout).unwrap();
    for key in ["rel_l2", "cosine", "top1_agreement", "kl"] {
        let (a, b) = (f[key].as_f64().unwrap(), v[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 2e-3 * b.abs().max(1e-2),
            "{key}: report {a} vs recomputed {b}"
        );
    }
    assert_eq!(f["positions"], v["positions"]);
    // The reduced model's own perplexity is worse than the original's, and eval says so.
    let before = eval(&lm.join("model.onnx"), "tract")["perplexity"]
        .as_f64()
        .unwrap();
    let after = eval(&out, "tract")["perplexity"].as_f64().unwrap();
    assert!(after > before, "{after} vs {before}");
    assert_eq!(r["calibration"]["samples_heldout"].as_u64().unwrap(), 42);
}

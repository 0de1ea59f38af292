//! `smoe-opt inspect --json` against a summary computed independently with the onnx package.
mod common;
use common::*;
use serde_json::Value;

#[test]
fn inspect_matches_the_onnx_package_on_every_model() {
    let Some(py) = python() else { return };
    for (name, dir) in models() {
        let model = dir.join("model.onnx");
        let o = bin()
            .arg("inspect")
            .arg(&model)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ours: Value = fitting(Schema::Inspect, &o.stdout);
        let r = run_py(&py, "inspect_ref.py", &[model.to_str().unwrap()]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let reference: Value = serde_json::from_slice(&r.stdout).unwrap();
        for key in ["ir_version", "opsets", "inputs", "outputs", "nodes", "ops"] {
            assert_eq!(ours[key], reference[key], "{name}: {key}");
        }
        let (oi, ri) = (&ours["initializers"], &reference["initializers"]);
        assert_eq!(oi["count"], ri["count"], "{name}");
        assert_eq!(oi["bytes"], ri["bytes"], "{name}");
        assert_eq!(oi["by_dtype"], ri["by_dtype"], "{name}");
        let ext = ours["external_data"].as_array().unwrap();
        let has_data = dir.join("model.onnx.data").exists();
        assert_eq!(ext.len(), usize::from(has_data), "{name}");
        if let Some(f) = ext.first() {
            let len = std::fs::metadata(dir.join("model.onnx.data"))
                .unwrap()
                .len();
            assert_eq!(f["bytes"], len);
            assert_eq!(f["location"], "model.onnx.data");
        }
    }
}

#[test]
fn inspect_text_is_readable() {
    let o = bin()
        .arg("inspect")
        .arg(root().join("testdata/models/mixtral_v4_ts_ext/model.onnx"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    for needle in [
        "ai.onnx=17",
        "input_ids",
        "[batch, seq]",
        "logits",
        "MatMul",
        "external data",
        "model.onnx.data",
    ] {
        assert!(s.contains(needle), "missing '{needle}' in:\n{s}");
    }
}

#[test]
fn global_flags_go_before_or_after_the_subcommand() {
    // `-q`/`-v` are global: `smoe-opt -q inspect M` is `smoe-opt inspect -q M`.
    let model = root().join("testdata/models/mixtral_v4_ts/model.onnx");
    let run = |args: &[&str]| {
        let o = bin().args(args).arg(&model).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let after = run(&["inspect", "-q", "--json"]);
    assert_eq!(run(&["-q", "inspect", "--json"]), after);
    assert_eq!(run(&["-v", "inspect", "--json"]), after);
    // Still a conflict, wherever given.
    let o = bin()
        .args(["-q", "-v", "inspect"])
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

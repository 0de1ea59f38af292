//! JSON Schemas generated from the Rust types are committed (`schemas/`) and the real outputs
//! fit them (checked with Python's `jsonschema`, independent of this crate).
//! Regenerate after a change: `SMOE_UPDATE_SCHEMAS=1 cargo test --test schemas`.
mod common;
use common::*;

fn committed(name: &str, generated: &serde_json::Value) -> std::path::PathBuf {
    let path = root().join("schemas").join(name);
    let text = serde_json::to_string_pretty(generated).unwrap() + "\n";
    if std::env::var_os("SMOE_UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == text,
        "{} is not what the types generate; run SMOE_UPDATE_SCHEMAS=1 cargo test --test schemas",
        path.display()
    );
    path
}

#[test]
fn inspect_json_of_every_model_fits_the_committed_schema() {
    let schema = committed("inspect.schema.json", &smoe_opt::inspect::schema());
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut docs = Vec::new();
    for (name, dir) in models() {
        let o = bin()
            .arg("inspect")
            .arg(dir.join("model.onnx"))
            .arg("--json")
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}");
        let p = tmp.path().join(format!("{name}.json"));
        std::fs::write(&p, &o.stdout).unwrap();
        docs.push(p);
    }
    assert_fits_schema(&py, &schema, &docs);
}

/// The `--report` of a copy, a re-emission, a merge and a sequential compression (segment
/// by segment: `execution`, `fidelity.blocks`, `compression`) fit the committed schema.
#[test]
fn reports_fit_the_committed_schema() {
    let schema = committed("report.schema.json", &smoe_opt::pipeline::report_schema());
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("testdata/models/mixtral_v4_ts");
    let io = dir.join("io.npz");
    let io = io.to_str().unwrap();
    let runs: [&[&str]; 4] = [
        &[],
        &["--method", "none"],
        &["--keep", "0.5", "--calib", io],
        &[
            "--target-size",
            "0.5",
            "--pipeline",
            "sequential",
            "--calib",
            io,
        ],
    ];
    let mut docs = vec![];
    for (i, extra) in runs.iter().enumerate() {
        let out = tmp.path().join(format!("{i}.onnx"));
        let r = reduce(&dir.join("model.onnx"), &out, extra);
        assert!(r.ok, "{extra:?}: {}", r.stderr);
        let rep = out.with_extension("report.json");
        assert!(rep.exists(), "{extra:?}: no report");
        docs.push(rep);
    }
    assert_fits_schema(&py, &schema, &docs);
}

/// Statistics files (`calibrate -o`) of a TorchScript Mixtral, the LM from text, and a
/// DeepSeek-V3 export fit the committed schema.
#[test]
fn stats_files_fit_the_committed_schema() {
    let schema = committed("stats.schema.json", &smoe_opt::calib::stats_schema());
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut docs = vec![];
    let lm = root().join("testdata/lm");
    let runs: Vec<(std::path::PathBuf, Vec<String>)> = vec![
        (
            root().join("testdata/models/mixtral_v4_ts/model.onnx"),
            vec![
                "--calib".into(),
                root()
                    .join("testdata/models/mixtral_v4_ts/io.npz")
                    .to_string_lossy()
                    .into_owned(),
            ],
        ),
        (
            lm.join("model.onnx"),
            [
                "--calib-text",
                lm.join("calib.txt").to_str().unwrap(),
                "--tokenizer",
                lm.join("tokenizer.json").to_str().unwrap(),
                "--seq-len",
                "32",
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            root().join("testdata/models/deepseekv3_v5_dynamo/model.onnx"),
            vec![
                "--calib-random".into(),
                "4".into(),
                "--seq-len".into(),
                "8".into(),
            ],
        ),
    ];
    for (i, (model, extra)) in runs.iter().enumerate() {
        let out = tmp.path().join(format!("stats{i}.json"));
        let o = bin()
            .arg("calibrate")
            .arg(model)
            .args(extra)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        docs.push(out);
    }
    assert_fits_schema(&py, &schema, &docs);
}

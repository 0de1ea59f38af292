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
        docs.push(p.to_str().unwrap().to_string());
    }
    let mut args = vec![schema.to_str().unwrap().to_string()];
    args.extend(docs);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_py(&py, "validate_schema.py", &refs);
    assert!(
        r.status.success(),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
}

//! Shared helpers of the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every committed test model (testdata/models and testdata/variants): (name, folder).
pub fn models() -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for sub in ["testdata/models", "testdata/variants", "testdata/planted"] {
        let dir = root().join(sub);
        v.extend(
            std::fs::read_dir(&dir)
                .expect(sub)
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("model.onnx").exists())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())),
        );
    }
    v.sort();
    assert!(
        v.len() >= 30,
        "expected the committed test models, found {}",
        v.len()
    );
    v
}

/// The Python interpreter with onnx/onnxruntime/numpy (set up by scripts/test.sh).
/// Under CI=true a missing interpreter is a failure, elsewhere the caller skips.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("SMOE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true but no Python with onnx/onnxruntime/numpy at {} (run scripts/test.sh)",
            p.display()
        );
    }
    eprintln!("skipping: no Python with onnx/onnxruntime (run scripts/test.sh)");
    None
}

/// Runs one of tests/py/*.py.
pub fn run_py(py: &Path, script: &str, args: &[&str]) -> Output {
    Command::new(py)
        .arg(root().join("tests/py").join(script))
        .args(args)
        .output()
        .expect("run python")
}

/// Asserts that every JSON document in `docs` fits the JSON Schema `schema` (Python's
/// `jsonschema`, through tests/py/validate_schema.py).
pub fn assert_fits_schema(py: &Path, schema: &Path, docs: &[PathBuf]) {
    let mut args = vec![schema.to_str().unwrap()];
    args.extend(docs.iter().map(|d| d.to_str().unwrap()));
    let r = run_py(py, "validate_schema.py", &args);
    assert!(
        r.status.success(),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
}

/// A committed JSON Schema (`schemas/`) that a JSON output of smoe-opt must fit.
#[derive(Clone, Copy, Debug)]
pub enum Schema {
    /// `inspect --json`.
    Inspect,
    /// `--report`.
    Report,
    /// `calibrate -o` (the statistics file).
    Stats,
}

/// Parses JSON that smoe-opt wrote and asserts that it fits its committed schema: every
/// JSON document the tests read goes through here (or through `assert_fits_schema`), not
/// only the samples of tests/schemas.rs. Without the test venv only the parse is checked
/// (as `python()` says, CI=true makes that a failure).
pub fn fitting(schema: Schema, bytes: &[u8]) -> serde_json::Value {
    static PY: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "smoe-opt wrote invalid JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
        )
    });
    if let Some(py) = PY.get_or_init(python) {
        let file = tempfile::Builder::new().suffix(".json").tempfile().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        let name = match schema {
            Schema::Inspect => "inspect.schema.json",
            Schema::Report => "report.schema.json",
            Schema::Stats => "stats.schema.json",
        };
        assert_fits_schema(
            py,
            &root().join("schemas").join(name),
            &[file.path().to_path_buf()],
        );
    }
    v
}

/// [`fitting`] of a file smoe-opt wrote.
pub fn fitting_file(schema: Schema, path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    fitting(schema, &bytes)
}

/// `pip install ARGS… <this repository>` with `py`, in the test build's profile (maturin
/// reuses the dependencies `cargo test` compiled; a user's `pip install .` builds release).
pub fn pip_install_this_repo(py: &Path, args: &[&str]) {
    let o = Command::new(py)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(args)
        .arg(root())
        .env("MATURIN_PEP517_ARGS", "--profile dev")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pip install . with {} failed:\n{}{}",
        py.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs tests/py/SCRIPT with `py` from `cwd` (outside the repository, so that `smoe_opt` is
/// the installed package), with `args` after the script and `env` set; asserts it exits 0
/// and prints "ok", and returns what it printed.
pub fn run_package_script(
    py: &Path,
    script: &str,
    args: &[&Path],
    cwd: &Path,
    env: &[(&str, &str)],
) -> String {
    let o = Command::new(py)
        .arg(root().join("tests/py").join(script))
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && out.contains("ok"), "{out}");
    out
}

/// The smoe-opt binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smoe-opt"))
}

/// Files in a folder (names), sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The external data file a model written by smoe-opt refers to (`None` for an inline
/// model). Panics when it refers to more than one file or to a missing one.
pub fn data_file(model: &Path) -> Option<PathBuf> {
    let locations = data_locations(&std::fs::read(model).unwrap());
    assert!(locations.len() <= 1, "{}: {locations:?}", model.display());
    let path = model.parent()?.join(locations.into_iter().next()?);
    assert!(path.is_file(), "{} is missing", path.display());
    Some(path)
}

/// The external data locations the tensors of a model file's bytes refer to.
pub fn data_locations(model_bytes: &[u8]) -> std::collections::BTreeSet<String> {
    use prost::Message;
    let mut proto = smoe_opt::onnx::proto::ModelProto::decode(model_bytes).unwrap();
    let mut locations = std::collections::BTreeSet::new();
    smoe_opt::onnx::walk::model_tensors_mut(&mut proto, &mut |t| {
        for e in &t.external_data {
            if e.key.as_deref() == Some("location") {
                locations.insert(e.value.clone().unwrap_or_default());
            }
        }
        Ok(())
    })
    .unwrap();
    locations
}

/// The bytes of a model and of its external data file (empty when inline).
pub fn model_and_data(model: &Path) -> (Vec<u8>, Vec<u8>) {
    let data = data_file(model).map(|p| std::fs::read(p).unwrap());
    (std::fs::read(model).unwrap(), data.unwrap_or_default())
}

/// Whether a model uses only standard ONNX ops (tract cannot run onnxruntime's contrib ops
/// such as com.microsoft.GroupQueryAttention or MoE).
pub fn standard_ops(model: &smoe_opt::Model) -> bool {
    model
        .graph
        .nodes()
        .all(|(_, n)| n.domain.as_deref().unwrap_or("").is_empty())
}

/// Whether a test model computes in half precision (its generator's truth.json says
/// `"precision": "fp16"`/`"bf16"`).
pub fn half_precision(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("truth.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|t| t["precision"].as_str().map(|p| p == "fp16" || p == "bf16"))
        .unwrap_or(false)
}

/// Whether the generator wrote QMoE (int4/int8) experts.
pub fn quantized(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("truth.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|t| t["layers"][0].get("quantization").is_some())
}

/// Relative tolerance for comparing a model's values against a float64 reference: 1e-4 in
/// float32; in float16, whose unit roundoff is 4.9e-4, values the model computed (router
/// logits, block inputs) already carry a few roundoffs, so 2e-3.
pub fn ref_rtol(dir: &Path) -> &'static str {
    if half_precision(dir) {
        "2e-3"
    } else {
        "1e-4"
    }
}

/// Tolerance for a rewritten model's outputs against the original's: `f32` for float32
/// models; for float16 ones the rewritten block computes in float16 in another order than
/// the fused op (which accumulates in float32), so outputs move by a few float16 roundoffs
/// (8e-4 on ortgenai_gptoss_fp16: `smoe-opt M --method none -o OUT`, then
/// `tests/py/compare_models.py M OUT --rtol 1 --like io.npz`): 4e-3.
pub fn out_rtol(dir: &Path, f32: &'static str) -> &'static str {
    if half_precision(dir) {
        "4e-3"
    } else {
        f32
    }
}

/// What one smoe-opt run returned: success, exit code, stderr and the `--report` JSON
/// (null when none was written).
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stderr: String,
    pub report: serde_json::Value,
}

/// Runs `smoe-opt MODEL -o OUT --report OUT.report.json ARGS…`.
pub fn reduce(model: &Path, out: &Path, args: &[&str]) -> Run {
    reduce_env(model, out, args, &[])
}

/// [`reduce`] with environment variables `env` set for the run.
pub fn reduce_env(model: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let rep = out.with_extension("report.json");
    let o = bin()
        .envs(env.iter().copied())
        .arg(model)
        .arg("-o")
        .arg(out)
        .arg("--report")
        .arg(&rep)
        .args(args)
        .output()
        .unwrap();
    // A written report is checked against the committed schema (as every JSON read here).
    let report = if rep.exists() {
        fitting_file(Schema::Report, &rep)
    } else {
        serde_json::Value::Null
    };
    Run {
        ok: o.status.success(),
        code: o.status.code(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        report,
    }
}

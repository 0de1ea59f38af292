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

//! The Olive pass (`smoe_opt.olive.SmoeOpt`): installs this repository's Python package into
//! the Olive venv named by `SMOE_OLIVE_PYTHON` (olive-ai and torch, from
//! `tests/requirements-olive.txt`), then `tests/py/test_olive_pass.py` runs the example
//! workflows in `examples/olive/` end to end (SmoeOpt then Olive's int8 quantisation; Olive's
//! own `olive run` with an Olive data config), compares each SmoeOpt step with this build's
//! `smoe-opt` binary given the same options (same bytes), checks the quantised model in
//! onnxruntime, and checks that a bad option stops the workflow with smoe-opt's message.
//!
//! Ignored by default (its venv is ~6 GB: torch's Linux wheels bring CUDA libraries);
//! `scripts/test.sh`, the README's test command, sets the venv up and runs it.
mod common;
use common::*;

#[test]
#[ignore = "needs the Olive venv (SMOE_OLIVE_PYTHON); scripts/test.sh sets it up and runs this"]
fn olive_example_workflows_run_the_pass_end_to_end() {
    let py = std::env::var_os("SMOE_OLIVE_PYTHON").expect(
        "SMOE_OLIVE_PYTHON must name a Python with tests/requirements-olive.txt installed \
         (scripts/test.sh makes one)",
    );
    // The test build's profile, as in tests/python_package.rs; no dependency resolution:
    // the venv's pinned numpy serves.
    let o = std::process::Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--force-reinstall",
        ])
        .arg(root())
        .env("MATURIN_PEP517_ARGS", "--profile dev")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pip install . into the Olive venv failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(&py)
        .arg(root().join("tests/py/test_olive_pass.py"))
        .arg(env!("CARGO_BIN_EXE_smoe-opt"))
        .arg(root())
        .arg(tmp.path())
        // Outside the repository: `smoe_opt` must come from the installed package.
        .current_dir(tmp.path())
        // Olive sends usage telemetry unless told not to; tests make no outside requests.
        .env("OLIVE_DISABLE_TELEMETRY", "1")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && out.contains("ok"), "{out}");
    // The measured numbers, for the log of the run.
    for line in out.lines().filter(|l| l.starts_with("example:")) {
        eprintln!("{line}");
    }
}

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
    let py = std::path::PathBuf::from(py);
    // No dependency resolution: the venv's pinned numpy serves.
    pip_install_this_repo(&py, &["--no-deps", "--force-reinstall"]);
    let tmp = tempfile::tempdir().unwrap();
    let out = run_package_script(
        &py,
        "test_olive_pass.py",
        &[
            std::path::Path::new(env!("CARGO_BIN_EXE_smoe-opt")),
            &root(),
            tmp.path(),
        ],
        tmp.path(),
        // Olive sends usage telemetry unless told not to; tests make no outside requests.
        &[("OLIVE_DISABLE_TELEMETRY", "1")],
    );
    // The measured numbers, for the log of the run.
    for line in out.lines().filter(|l| l.starts_with("example:")) {
        eprintln!("{line}");
    }
}

//! The Python package: `pip install .` of this repository into a fresh venv (maturin builds
//! the pyo3 module), then `tests/py/test_python_package.py` calls `inspect`, `calibrate`
//! and `optimize` on the bundled LM and compares them with this build's `smoe-opt` binary
//! (same reports and model bytes, numpy arrays as calibration data, typed exceptions with
//! the CLI's messages, log records in Python's logging).
mod common;
use common::*;

#[test]
fn pip_install_gives_a_package_that_matches_the_cli() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let venv = tmp.path().join("venv");
    let o = std::process::Command::new(&py)
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vpy = venv.join("bin/python");
    // numpy pinned as the test venv's.
    let constraints = root().join("tests/requirements.txt");
    pip_install_this_repo(&vpy, &["-c", constraints.to_str().unwrap()]);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    run_package_script(
        &vpy,
        "test_python_package.py",
        &[
            std::path::Path::new(env!("CARGO_BIN_EXE_smoe-opt")),
            &root().join("testdata/lm"),
            &work,
        ],
        tmp.path(),
        &[],
    );
}

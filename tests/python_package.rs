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
    // The test build's profile: maturin reuses the dependencies `cargo test` compiled (a
    // user's `pip install .` builds release). numpy pinned as the test venv's.
    let o = std::process::Command::new(&vpy)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
        ])
        .arg(root().join("tests/requirements.txt"))
        .arg(root())
        .env("MATURIN_PEP517_ARGS", "--profile dev")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pip install . failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let o = std::process::Command::new(&vpy)
        .arg(root().join("tests/py/test_python_package.py"))
        .arg(env!("CARGO_BIN_EXE_smoe-opt"))
        .arg(root().join("testdata/lm"))
        .arg(&work)
        // Run from outside the repository: `import smoe_opt` must find the installed package.
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && out.contains("ok"), "{out}");
}

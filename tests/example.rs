//! `examples/library.rs` (the library walk-through: load, detect, calibrate, save statistics,
//! merge then compress from them, measure, save) runs on the bundled LM and writes the same
//! bytes as the command line given the same job.
mod common;
use common::*;

#[allow(dead_code)]
#[path = "../examples/library.rs"]
mod library;

#[test]
fn library_example_writes_what_the_cli_writes() {
    let lm = root().join("testdata/lm");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lib.onnx");
    let args = [
        lm.join("model.onnx"),
        lm.join("calib.txt"),
        lm.join("tokenizer.json"),
        lm.join("eval.npz"),
        out.clone(),
    ];
    let mut printed = Vec::new();
    library::run(&args, &mut printed).unwrap();
    let stdout = String::from_utf8(printed).unwrap();
    for line in [
        "moe.0: 8 experts, top-2",
        "routing frequencies",
        "merge",
        "held-out: rel L2",
    ] {
        assert!(stdout.contains(line), "no '{line}' in:\n{stdout}");
    }
    assert!(tmp.path().join("lib.stats.npz").exists());

    let cli_out = tmp.path().join("cli.onnx");
    let r = reduce(
        &lm.join("model.onnx"),
        &cli_out,
        &[
            "--keep",
            "0.5",
            "--target-size",
            "0.4",
            "--calib-text",
            lm.join("calib.txt").to_str().unwrap(),
            "--tokenizer",
            lm.join("tokenizer.json").to_str().unwrap(),
            "--seq-len",
            "128",
            "--eval-data",
            lm.join("eval.npz").to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&cli_out).unwrap(),
        "the example's model differs from the CLI's"
    );
    let rel = r.report["fidelity"]["rel_l2"].as_f64().unwrap();
    assert!(
        stdout.contains(&format!("rel L2 {rel:.4}")),
        "CLI rel L2 {rel:.4}; example said:\n{stdout}"
    );
}

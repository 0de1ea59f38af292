//! Hostile inputs: no panic, abort or hang; a clear error with a non-zero exit code; no input
//! overwritten; nothing half-written left behind.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

fn lm() -> PathBuf {
    root().join("testdata/lm")
}

/// Runs smoe-opt with `args`, killed after 60 s (a hang fails the test instead of the run).
fn run(args: &[&str]) -> Output {
    let o = std::process::Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_smoe-opt"))
        .args(args)
        .arg("-q")
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(124), "{args:?} hung");
    o
}

/// Asserts a clean failure: exit `code`, stderr containing `needle`, no panic.
fn fails(o: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn npz(dir: &Path, name: &str, ids: &[i64], seq: usize) -> PathBuf {
    let py = python().expect("the test venv");
    let path = dir.join(name);
    let code = format!(
        "import numpy as np, sys\n\
         ids = np.array({ids:?}, dtype=np.int64).reshape(-1, {seq})\n\
         np.savez(sys.argv[1], input_ids=ids, attention_mask=np.ones_like(ids),\n\
                  position_ids=np.tile(np.arange({seq}), (len(ids), 1)))\n"
    );
    let o = std::process::Command::new(py)
        .arg("-c")
        .arg(code)
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    path
}

#[test]
fn token_ids_outside_the_vocabulary_are_named() {
    if python().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bad = npz(tmp.path(), "bad.npz", &[1, 2, 100000, 3], 4);
    let model = lm().join("model.onnx");
    let (m, b) = (model.to_str().unwrap(), bad.to_str().unwrap());
    let out = tmp.path().join("o.onnx");
    let stats = tmp.path().join("s.json");
    for args in [
        vec!["calibrate", m, "--calib", b, "-o", stats.to_str().unwrap()],
        vec!["eval", m, "--data", b],
        vec!["eval", m, "--data", b, "--runtime", "ort"],
        vec![
            m,
            "-o",
            out.to_str().unwrap(),
            "--keep",
            "0.5",
            "--calib",
            b,
        ],
    ] {
        let o = run(&args);
        fails(&o, 2, "holds 100000, outside the 512 rows");
    }
    assert!(!out.exists() && !stats.exists());
}

#[test]
fn sizes_that_cannot_fit_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let m = lm().join("model.onnx");
    let m = m.to_str().unwrap();
    let out = tmp.path().join("o.onnx");
    let o = out.to_str().unwrap();
    let text = lm().join("calib.txt");
    let tok = lm().join("tokenizer.json");
    let (text, tok) = (text.to_str().unwrap(), tok.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--calib-text",
                text,
                "--tokenizer",
                tok,
                "--seq-len",
                "1000000",
            ],
            "lower --seq-len or --batch",
        ),
        (
            vec!["--calib-random", "4000000000"],
            "ask for fewer samples",
        ),
        (vec!["--calib-random", "100000000000"], "--calib-random"),
        (
            vec!["--calib-random", "2", "--layers", "0-4000000000"],
            "out of range",
        ),
        (
            vec!["--calib-random", "2", "--layers", "0-18446744073709551615"],
            "out of range",
        ),
        (vec!["--calib-random", "2", "--batch", "0"], "--batch"),
        (vec!["--calib-random", "2", "--max-error", "NaN"], "finite"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![m, "-o", o, "--keep", "0.5"];
        args.extend(extra);
        fails(&run(&args), 2, needle);
        assert!(!out.exists());
    }
    let args = [m, "-o", o, "--experts", "1000", "--calib-random", "2"];
    fails(&run(&args), 2, "at most 8");
}

#[test]
fn devices_fifos_and_folders_are_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let f = fifo.to_str().unwrap();
    let m = lm().join("model.onnx");
    let m = m.to_str().unwrap();
    let out = tmp.path().join("o.onnx");
    let o = out.to_str().unwrap();
    let text = lm().join("calib.txt");
    let tok = lm().join("tokenizer.json");
    let (text, tok) = (text.to_str().unwrap(), tok.to_str().unwrap());
    let cases: Vec<Vec<&str>> = vec![
        vec![f, "-o", o, "--keep", "0.5", "--calib-random", "2"],
        vec![
            m,
            "-o",
            o,
            "--keep",
            "0.5",
            "--calib-text",
            f,
            "--tokenizer",
            tok,
        ],
        vec![
            m,
            "-o",
            o,
            "--keep",
            "0.5",
            "--calib-text",
            "/dev/zero",
            "--tokenizer",
            tok,
        ],
        vec![
            m,
            "-o",
            o,
            "--keep",
            "0.5",
            "--calib-text",
            text,
            "--tokenizer",
            "/dev/zero",
        ],
        vec![m, "-o", o, "--keep", "0.5", "--calib", f],
        vec![m, "-o", o, "--keep", "0.5", "--stats", "/dev/zero"],
        vec!["eval", m, "--data", f],
    ];
    for args in cases {
        let r = run(&args);
        fails(&r, 1, "regular files");
        assert!(!out.exists());
    }
}

#[test]
fn outputs_never_overwrite_inputs_or_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    // Copies, so a regression cannot damage the committed test data.
    for f in ["model.onnx", "calib.txt", "tokenizer.json", "eval.npz"] {
        std::fs::copy(lm().join(f), tmp.path().join(f)).unwrap();
    }
    let p = |f: &str| tmp.path().join(f).to_str().unwrap().to_string();
    let (m, text, tok, evalz) = (
        p("model.onnx"),
        p("calib.txt"),
        p("tokenizer.json"),
        p("eval.npz"),
    );
    let before: Vec<Vec<u8>> = [&m, &text, &tok, &evalz]
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    let o = p("o.onnx");
    let (snpz, ejson) = (p("s.npz"), p("eval.json"));
    let linked = p("linked.onnx");
    std::fs::hard_link(&m, &linked).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                &m,
                "-o",
                &o,
                "--keep",
                "0.5",
                "--calib-random",
                "2",
                "--report",
                &m,
            ],
            "--report",
        ),
        (
            vec![
                &m,
                "-o",
                &o,
                "--keep",
                "0.5",
                "--calib-random",
                "2",
                "--report",
                &o,
            ],
            "are the same file",
        ),
        (
            vec![
                &m,
                "-o",
                &text,
                "--keep",
                "0.5",
                "--calib-text",
                &text,
                "--tokenizer",
                &tok,
            ],
            "--calib-text",
        ),
        (
            vec![
                &m,
                "-o",
                &tok,
                "--keep",
                "0.5",
                "--calib-text",
                &text,
                "--tokenizer",
                &tok,
            ],
            "--tokenizer",
        ),
        (
            vec![&m, "-o", &evalz, "--keep", "0.5", "--calib", &evalz],
            "--calib",
        ),
        (
            vec!["calibrate", &m, "-o", &m, "--calib-random", "2"],
            "input model",
        ),
        (
            vec!["calibrate", &m, "-o", &snpz, "--calib-random", "2"],
            "same file",
        ),
        (
            vec!["calibrate", &m, "-o", &ejson, "--calib", &evalz],
            "sidecar",
        ),
        // A hard link is the same file under another name.
        (vec![&m, "-o", &linked, "--method", "none"], "input model"),
    ];
    for (args, needle) in cases {
        fails(&run(&args), 2, needle);
    }
    let after: Vec<Vec<u8>> = [&m, &text, &tok, &evalz]
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(before == after, "an input changed");
    assert!(!Path::new(&o).exists());
}

#[test]
fn a_report_that_cannot_be_written_leaves_no_model() {
    let tmp = tempfile::tempdir().unwrap();
    let m = lm().join("model.onnx");
    let out = tmp.path().join("o.onnx");
    let rep = tmp.path().join("missing/r.json");
    let args = [
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--keep",
        "0.5",
        "--calib-random",
        "2",
        "--report",
        rep.to_str().unwrap(),
    ];
    fails(&run(&args), 1, "does not exist");
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));
}

#[test]
fn nan_weights_are_refused_with_the_tensor() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("nan.onnx");
    let code = "import onnx, numpy as np, sys\n\
                from onnx import numpy_helper\n\
                m = onnx.load(sys.argv[1])\n\
                t = [t for t in m.graph.initializer if list(t.dims) == [96, 192]][3]\n\
                a = numpy_helper.to_array(t).copy(); a[1, 2] = np.inf\n\
                t.CopyFrom(numpy_helper.from_array(a, t.name))\n\
                onnx.save(m, sys.argv[2])\n";
    let o = std::process::Command::new(py)
        .arg("-c")
        .arg(code)
        .arg(lm().join("model.onnx"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("o.onnx");
    for extra in [["--keep", "0.5"], ["--target-size", "0.5"]] {
        let mut args = vec![bad.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(extra);
        args.extend(["--calib-random", "2"]);
        fails(&run(&args), 1, "holds inf");
        assert!(!out.exists());
    }
}

#[test]
fn npz_headers_claiming_more_than_they_hold_are_refused() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    // A stored (uncompressed) zip entry whose .npy header claims 10^12 int64 values.
    let path = tmp.path().join("huge.npz");
    let f = std::fs::File::create(&path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("input_ids.npy", opts).unwrap();
    let dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (1000000, 1000000), }";
    let mut header = dict.to_string();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 64]);
    z.write_all(&bytes).unwrap();
    z.finish().unwrap();
    let m = lm().join("model.onnx");
    let out = tmp.path().join("o.onnx");
    let p = path.to_str().unwrap();
    for args in [
        vec!["eval", m.to_str().unwrap(), "--data", p],
        vec![
            m.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--keep",
            "0.5",
            "--calib",
            p,
        ],
    ] {
        fails(&run(&args), 1, "claims shape [1000000, 1000000]");
    }
}

#[test]
fn interrupted_runs_leave_no_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    let m = lm().join("model.onnx");
    let out = tmp.path().join("o.onnx");
    // The report's temporary file exists from the start of the run.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smoe-opt"))
        .arg(&m)
        .arg("-o")
        .arg(&out)
        .args([
            "--target-size",
            "0.5",
            "--calib-random",
            "64",
            "-q",
            "--report",
        ])
        .arg(tmp.path().join("r.json"))
        .spawn()
        .unwrap();
    // The run (calibration of 64 samples, then the auto planner) takes seconds; the
    // report's file appears in its first milliseconds.
    let t0 = std::time::Instant::now();
    while listing(tmp.path()).is_empty() {
        assert!(t0.elapsed().as_secs() < 60, "no temporary file appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its temporary file was seen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "not interrupted: {status:?}");
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));
}

#[test]
fn external_data_naming_the_model_itself_is_refused() {
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let mut m = smoe_opt::onnx::proto::ModelProto::decode(
        std::fs::read(root().join("testdata/variants/mixtral_n8_k2/model.onnx"))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    let kv = |k: &str, v: &str| smoe_opt::onnx::proto::StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    t.raw_data = None;
    t.float_data.clear();
    t.data_location = Some(smoe_opt::onnx::proto::tensor_proto::DataLocation::External as i32);
    t.external_data = vec![
        kv("location", "self.onnx"),
        kv("offset", "0"),
        kv("length", "16"),
    ];
    let path = tmp.path().join("self.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let o = run(&["inspect", path.to_str().unwrap()]);
    fails(&o, 1, "the model file itself");
}

#[test]
fn statistics_of_another_model_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("lm.json");
    let m = lm().join("model.onnx");
    let o = run(&[
        "calibrate",
        m.to_str().unwrap(),
        "--calib-random",
        "4",
        "-o",
        stats.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("o.onnx");
    let other = root().join("testdata/lm_upcycled/model.onnx");
    // Same shapes, other weights.
    let args = [
        other.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--keep",
        "0.5",
        "--stats",
        stats.to_str().unwrap(),
    ];
    fails(&run(&args), 2, "its router weights differ");
    // A file edited by hand: no fingerprint, another hidden size.
    let mut j: serde_json::Value = fitting_file(Schema::Stats, &stats);
    for l in j["layers"].as_array_mut().unwrap() {
        l["router_fingerprint"] = "".into();
        l["hidden"] = 97.into();
    }
    std::fs::write(&stats, serde_json::to_string(&j).unwrap()).unwrap();
    let args = [
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--target-size",
        "0.5",
        "--stats",
        stats.to_str().unwrap(),
    ];
    fails(&run(&args), 2, "hidden size 97 there, 96 here");
    assert!(!out.exists());
}

#[test]
fn a_top_k_larger_than_the_experts_is_diagnosed() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("k9.onnx");
    let code = "import onnx, numpy as np, sys\n\
                from onnx import numpy_helper\n\
                m = onnx.load(sys.argv[1])\n\
                k = [n.input[1] for n in m.graph.node if n.op_type == 'TopK'][0]\n\
                for c in m.graph.node:\n\
                \x20   if c.op_type == 'Constant' and c.output[0] == k:\n\
                \x20       c.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([9], dtype=np.int64)))\n\
                for t in m.graph.initializer:\n\
                \x20   if t.name == k:\n\
                \x20       t.CopyFrom(numpy_helper.from_array(np.array([9], dtype=np.int64), k))\n\
                onnx.save(m, sys.argv[2])\n";
    let o = std::process::Command::new(py)
        .arg("-c")
        .arg(code)
        .arg(root().join("testdata/variants/mixtral_n8_k2/model.onnx"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["inspect", bad.to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    let j: serde_json::Value = fitting(Schema::Inspect, &o.stdout);
    assert_eq!(j["moe_blocks"].as_array().unwrap().len(), 0);
    let diags = j["diagnostics"].to_string();
    assert!(
        diags.contains("top-k 9 does not fit its 8 experts"),
        "{diags}"
    );
}

#[test]
fn without_onnxruntime_the_error_says_how_to_get_it() {
    // A builder model needs onnxruntime (contrib ops); with the library made unfindable,
    // calibration, eval and a reduction fail cleanly and say what to install.
    let dir = root().join("testdata/models/ortgenai_gptoss_fp32");
    let tmp = tempfile::tempdir().unwrap();
    let model = dir.join("model.onnx");
    let io = dir.join("io.npz");
    let stats = tmp.path().join("s.json");
    let out = tmp.path().join("o.onnx");
    let cases: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec![
            "calibrate".as_ref(),
            model.as_os_str(),
            "--calib".as_ref(),
            io.as_os_str(),
            "-o".as_ref(),
            stats.as_os_str(),
        ],
        vec![
            "eval".as_ref(),
            model.as_os_str(),
            "--data".as_ref(),
            io.as_os_str(),
        ],
        vec![
            model.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--keep".as_ref(),
            "0.5".as_ref(),
            "--calib".as_ref(),
            io.as_os_str(),
        ],
    ];
    for args in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_smoe-opt"))
            .env("ORT_DYLIB_PATH", tmp.path().join("missing.so"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {err}");
        assert!(err.contains("pip install onnxruntime"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!stats.exists() && !out.exists(), "{args:?} wrote output");
    }
}

#[test]
fn a_killed_write_never_pairs_a_model_with_other_data() {
    // kill -9 at points spread over a run that rewrites an existing OUT.onnx and its data
    // file: afterwards the model and the data it names are both the old ones or both the new
    // ones (bytes compared; the output is deterministic), and a model is always there (the
    // new data goes under its own name, then the model is renamed over the old one).
    let dir = root().join("testdata/models/mixtral_v4_ts");
    let model = dir.join("model.onnx");
    let io = dir.join("io.npz");
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path, new: bool| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            model.clone().into(),
            "-o".into(),
            out.into(),
            "--external-data".into(),
            "-q".into(),
        ];
        if new {
            a.extend(["--keep", "0.5", "--calib"].map(Into::into));
            a.push(io.clone().into());
        } else {
            a.extend(["--method", "none"].map(Into::into));
        }
        a
    };
    // The model's bytes, the name of the data file it refers to, and that file's bytes
    // (None when it is missing).
    type Pair = (Vec<u8>, String, Option<Vec<u8>>);
    let pair = |out: &Path| -> Option<Pair> {
        let m = std::fs::read(out).ok()?;
        let names = data_locations(&m);
        assert_eq!(names.len(), 1, "{names:?}");
        let name = names.into_iter().next().unwrap();
        let d = std::fs::read(out.parent().unwrap().join(&name)).ok();
        Some((m, name, d))
    };
    // The old and the new outputs, written in full.
    let mut full = Vec::new();
    let mut took = std::time::Duration::ZERO;
    for new in [false, true] {
        // The same file name as below (the data file is named after the model).
        let d = tmp.path().join(format!("full{new}"));
        std::fs::create_dir(&d).unwrap();
        let out = d.join("out.onnx");
        let t = std::time::Instant::now();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_smoe-opt"))
            .args(args(&out, new))
            .output()
            .unwrap();
        took = t.elapsed();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        full.push(pair(&out).unwrap());
    }
    assert!(full[0] != full[1] && full[0].1 != full[1].1);
    let work = tmp.path().join("work");
    let out = work.join("out.onnx");
    let (mut old, mut new) = (0, 0);
    // Under load the child runs slower than the timed run above, so the kill times keep
    // growing past the 24 planned ones until a kill lands after the commit (a child that
    // finished before its kill counts too); the cap is 20× the timed run.
    let mut i = 0u32;
    while i < 24 || (new == 0 && i < 400) {
        let k = i;
        i += 1;
        // Start from the old output alone.
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        std::fs::write(&out, &full[0].0).unwrap();
        std::fs::write(work.join(&full[0].1), full[0].2.as_ref().unwrap()).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smoe-opt"))
            .args(args(&out, true))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(took * k / 20);
        let _ = child.kill();
        let finished = child.wait().unwrap().success();
        match pair(&out) {
            None => panic!("kill after {:?}: no model left", took * k / 20),
            Some(p) if p == full[0] => old += 1,
            Some(p) if p == full[1] => new += 1,
            Some((m, name, d)) => panic!(
                "kill after {:?}: a model beside data it was not written with (model old {} new {}, \
                 names {name}, data old {} new {}, {:?} data bytes)",
                took * k / 20,
                m == full[0].0,
                m == full[1].0,
                d == full[0].2,
                d == full[1].2,
                d.map(|d| d.len())
            ),
        }
        if finished {
            // A completed run removed the replaced data file.
            assert_eq!(listing(&work), ["out.onnx".to_string(), full[1].1.clone()]);
        }
    }
    // The kills landed before, during and after the commit.
    eprintln!("killed runs: {old} left the old pair, {new} the new pair");
    assert!(old > 0 && new > 0, "old {old}, new {new}");
}

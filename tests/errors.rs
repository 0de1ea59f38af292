//! Bad input: every case gives a clear error naming the file/tensor, exit code 1 (2 for
//! usage), and leaves no output file (nor temporary files) behind.
mod common;
use common::*;
use prost::Message;
use smoe_opt::ir::builder::{node, tensor_f32, Dim, ModelBuilder};
use smoe_opt::onnx::proto::tensor_proto::{DataLocation, DataType};
use smoe_opt::onnx::proto::{ModelProto, StringStringEntryProto};
use std::path::Path;

/// Runs `smoe-opt input -o out` in `dir`; asserts failure with `code`, stderr containing
/// every `needle`, and no new file in `dir`.
fn expect_failure(dir: &Path, input: &Path, code: i32, needles: &[&str]) {
    let before = listing(dir);
    let out = dir.join("out.onnx");
    let o = bin().arg(input).arg("-o").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks '{n}': {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(listing(dir), before, "files left behind");
    // inspect fails the same way.
    let o = bin().arg("inspect").arg(input).output().unwrap();
    assert_eq!(o.status.code(), Some(code));
}

fn small_model() -> ModelProto {
    ModelBuilder::new("g")
        .input("x", DataType::Float, &[Dim::Sym("n".into()), 4.into()])
        .output("y", DataType::Float, &[Dim::Sym("n".into()), 2.into()])
        .init(tensor_f32("w", &[4, 2], &[0.5; 8]))
        .node(node("MatMul", "mm", &["x", "w"], &["y"], vec![]))
        .build()
}

fn external_model(location: &str, offset: u64, length: u64) -> ModelProto {
    let mut m = small_model();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.raw_data = None;
    t.data_location = Some(DataLocation::External as i32);
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    t.external_data = vec![
        kv("location", location.into()),
        kv("offset", offset.to_string()),
        kv("length", length.to_string()),
    ];
    m
}

#[test]
fn truncated_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(root().join("testdata/models/mixtral_v4_ts/model.onnx")).unwrap();
    let p = tmp.path().join("truncated.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_failure(
        tmp.path(),
        &p,
        1,
        &["truncated.onnx", "not a valid ONNX model"],
    );
}

#[test]
fn random_bytes_and_empty_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut state = 0x2545F4914F6CDD1Du64;
    for (i, len) in [1usize, 7, 100, 4096, 100_000].into_iter().enumerate() {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let p = tmp.path().join(format!("random{i}.onnx"));
        std::fs::write(&p, data).unwrap();
        expect_failure(tmp.path(), &p, 1, &[&format!("random{i}.onnx")]);
    }
    let p = tmp.path().join("empty.onnx");
    std::fs::write(&p, b"").unwrap();
    expect_failure(tmp.path(), &p, 1, &["empty.onnx", "empty"]);
}

#[test]
fn missing_external_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.onnx");
    std::fs::write(&p, external_model("weights.bin", 0, 32).encode_to_vec()).unwrap();
    expect_failure(tmp.path(), &p, 1, &["m.onnx", "tensor 'w'", "weights.bin"]);
}

#[test]
fn external_path_escaping_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = tmp.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(tmp.path().join("secret.bin"), [0u8; 32]).unwrap();
    for loc in ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"] {
        let p = inner.join("m.onnx");
        std::fs::write(&p, external_model(loc, 0, 32).encode_to_vec()).unwrap();
        expect_failure(&inner, &p, 1, &["tensor 'w'", "folder"]);
    }
    // A symlink inside the folder that points outside it.
    std::os::unix::fs::symlink(tmp.path().join("secret.bin"), inner.join("link.bin")).unwrap();
    let p = inner.join("m.onnx");
    std::fs::write(&p, external_model("link.bin", 0, 32).encode_to_vec()).unwrap();
    expect_failure(&inner, &p, 1, &["tensor 'w'", "outside the model's folder"]);
}

#[test]
fn tensor_declared_larger_than_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    // External: the file holds 16 bytes, the tensor needs 32.
    std::fs::write(tmp.path().join("w.bin"), [0u8; 16]).unwrap();
    let p = tmp.path().join("ext.onnx");
    let mut m = external_model("w.bin", 0, 32);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    expect_failure(tmp.path(), &p, 1, &["tensor 'w'", "only 16 bytes"]);
    // External: declared length disagrees with the dims.
    m.graph.as_mut().unwrap().initializer[0].external_data[2].value = Some("8".into());
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    expect_failure(tmp.path(), &p, 1, &["tensor 'w'", "disagrees"]);
    // Inline: dims say 4x2 floats (32 bytes), raw_data has 8.
    let mut m = small_model();
    m.graph.as_mut().unwrap().initializer[0].raw_data = Some(vec![0u8; 8].into());
    let p = tmp.path().join("inline.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    expect_failure(
        tmp.path(),
        &p,
        1,
        &["inline.onnx", "tensor 'w'", "32 bytes"],
    );
    // Absurd dims (would overflow / be petabytes) must not allocate.
    let mut m = external_model("w.bin", 0, 16);
    m.graph.as_mut().unwrap().initializer[0].dims = vec![1 << 40, 1 << 30];
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    expect_failure(tmp.path(), &p, 1, &["tensor 'w'"]);
}

#[test]
fn invalid_graph_is_reported_with_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = small_model();
    m.graph.as_mut().unwrap().node[0].input[0] = "nowhere".into();
    let p = tmp.path().join("g.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    let out = tmp.path().join("out.onnx");
    let o = bin().arg(&p).arg("-o").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mm (MatMul)") && err.contains("nowhere") && err.contains("g.onnx"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn refuses_to_overwrite_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.onnx");
    std::fs::write(&p, small_model().encode_to_vec()).unwrap();
    let before = std::fs::read(&p).unwrap();
    let o = bin().arg(&p).arg("-o").arg(&p).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Through a different spelling of the same path, too.
    let alias = tmp.path().join(".").join("m.onnx");
    let o = bin().arg(&p).arg("-o").arg(&alias).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec![],
        vec!["m.onnx"],
        vec!["--no-such-flag"],
        vec!["inspect"],
    ] {
        let o = bin().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }
    let o = bin().arg("--help").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Examples"));
}

#[test]
fn unwritable_output_folder_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.onnx");
    std::fs::write(&p, small_model().encode_to_vec()).unwrap();
    let out = tmp.path().join("no/such/dir/out.onnx");
    let o = bin().arg(&p).arg("-o").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no/such/dir"));
}

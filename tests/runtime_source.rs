//! Which runtime receives a model, and how. Weights in external data files stay references
//! to the input's data file (onnxruntime maps it) instead of being copied into the encoded
//! model, and the model computes exactly what it computes inline. Models with onnxruntime's
//! fused MoE operators go to onnxruntime without a failed try in tract.
#![cfg(feature = "ort")]
mod common;
use common::*;
use smoe_opt::runtime::{model_source, ModelSource, Session, Value};
use smoe_opt::Model;

fn run(model: &Model, feed: &[(String, Value)], in_place: bool) -> Vec<f32> {
    let mut s = smoe_opt::runtime::ort::OrtSession::from_model(model, Default::default()).unwrap();
    assert_eq!(s.weights_in_place(), in_place);
    let out = s.run(feed).unwrap();
    let (_, logits) = out.iter().find(|(k, _)| k == "logits").unwrap();
    logits.to_f32().iter().copied().collect()
}

#[test]
fn onnxruntime_reads_external_weights_in_place() {
    if !smoe_opt::runtime::ort_available() {
        eprintln!("skipped: onnxruntime's library not found");
        return;
    }
    let models = root().join("testdata/models");
    // mixtral_v4_ts_ext is mixtral_v4_ts saved with its weights in model.onnx.data.
    let ext = Model::load(models.join("mixtral_v4_ts_ext/model.onnx")).unwrap();
    let inline = Model::load(models.join("mixtral_v4_ts/model.onnx")).unwrap();
    let data = ext.external_files()[0].bytes;
    assert!(data > 100_000, "the fixture's external data: {data} bytes");

    let (bytes, folder) = ext.to_bytes_referencing().unwrap();
    assert_eq!(
        folder.as_deref(),
        Some(models.join("mixtral_v4_ts_ext").as_path())
    );
    // The encoded model carries the graph and small tensors, not the external weights.
    let whole = ext.to_inline_bytes().unwrap().len() as u64;
    assert!(
        (bytes.len() as u64) + data <= whole + 4096,
        "referencing {} bytes, inline {whole}, data {data}",
        bytes.len()
    );
    assert!(matches!(
        model_source(&ext, true).unwrap(),
        ModelSource::Referencing { .. }
    ));
    // tract reads models only from memory or its own files: everything inline.
    assert!(matches!(
        model_source(&ext, false).unwrap(),
        ModelSource::Bytes(_)
    ));
    // A model without external data has nothing to reference.
    assert!(matches!(
        model_source(&inline, true).unwrap(),
        ModelSource::Bytes(_)
    ));

    // The export's own inputs and logits (torch, recorded by testdata/gen).
    let io = smoe_opt::runtime::read_npz(&models.join("mixtral_v4_ts_ext/io.npz")).unwrap();
    let feed: Vec<(String, Value)> = io.iter().filter(|(k, _)| k != "logits").cloned().collect();
    let expected: Vec<f32> = io
        .iter()
        .find(|(k, _)| k == "logits")
        .unwrap()
        .1
        .to_f32()
        .iter()
        .copied()
        .collect();
    let referenced = run(&ext, &feed, true);
    // Bit for bit what onnxruntime computes with every weight inline.
    assert_eq!(referenced, run(&inline, &feed, false));
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = referenced
        .iter()
        .zip(&expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // float32 through a few layers, against the exporter's recorded logits (as ref_rtol).
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "max |Δ| {worst}, scale {scale}"
    );
}

#[test]
fn fused_moe_models_go_straight_to_onnxruntime() {
    if !smoe_opt::runtime::ort_available() {
        eprintln!("skipped: onnxruntime's library not found");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (name, op) in [
        ("ortgenai_gptoss_fp32", "com.microsoft.MoE"),
        ("ortgenai_lfm2moe_int4", "com.microsoft.QMoE"),
    ] {
        let d = root().join("testdata/models").join(name);
        let o = bin()
            .arg("calibrate")
            .arg(d.join("model.onnx"))
            .arg("--calib")
            .arg(d.join("io.npz"))
            .arg("-v")
            .arg("-o")
            .arg(tmp.path().join(format!("{name}.json")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        assert!(
            err.contains(&format!("{op} runs in onnxruntime only")),
            "{name}: {err}"
        );
        assert!(
            err.contains("calibrating with onnxruntime"),
            "{name}: {err}"
        );
        assert!(!err.contains("tract failed"), "{name}: {err}");
    }
}

//! Graph segments (issue 14): every committed model, cut at its MoE blocks, runs segment by
//! segment to what the whole model computes. The reference is the whole model run once with
//! every crossing tensor exposed as an output (the same runtime, the same inputs: the export
//! input in io.npz).
//!
//! Tolerances: fed the whole model's own tensors, a segment evaluates the same nodes on the
//! same values, so it differs only where a runtime fuses or reorders across the cut: 1e-5
//! relative (L2) for floats, exact for integers. Chained (each segment fed the previous
//! segments' outputs), such differences can pass through every later layer: 1e-4. Models
//! that compute in float16 (whose unit roundoff is 4.9e-4) differ by a roundoff where a fused
//! kernel sees another boundary (2.1e-4 measured on ortgenai_gptoss_fp16's MoE output): 2e-3
//! and 4e-3 (the helpers' `ref_rtol`/`out_rtol` for float16).
#![cfg(feature = "tract")]
mod common;
use common::*;
use smoe_opt::runtime::{candidates, open_in, rel_err, Runtime, Value};
use smoe_opt::segment::{cut, Segmentation};
use smoe_opt::Model;
use std::collections::HashMap;

/// Runs `m` on `feed` in the first runtime of `rts` that can.
fn run_in(
    m: &Model,
    feed: &[(String, Value)],
    rts: &[Runtime],
) -> Result<(Runtime, HashMap<String, Value>), String> {
    let mut errors = Vec::new();
    for &rt in rts {
        let out = open_in(
            m,
            rt,
            #[cfg(feature = "ort")]
            smoe_opt::runtime::Ep::Cpu,
        )
        .and_then(|mut s| s.run(feed));
        match out {
            Ok(v) => return Ok((rt, v.into_iter().collect())),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(errors.join("; "))
}

/// Runs `m` on `feed` in the first runtime that can (tract, then onnxruntime).
fn run(m: &Model, feed: &[(String, Value)]) -> Result<HashMap<String, Value>, String> {
    run_in(m, feed, &candidates(Runtime::Auto)).map(|(_, v)| v)
}

fn close(name: &str, what: &str, got: &Value, want: &Value, tol: f32) {
    match (got, want) {
        (Value::I64(a), Value::I64(b)) => assert_eq!(a, b, "{name}: {what}"),
        (a, b) => {
            assert_eq!(a.shape(), b.shape(), "{name}: {what}");
            let e = rel_err(&a.to_f32(), &b.to_f32());
            assert!(e <= tol, "{name}: {what}: relative error {e} > {tol}");
        }
    }
}

/// Model outputs part of which is uninitialised memory in onnxruntime itself: the sliding
/// window layer of onnxruntime-genai's gpt-oss graphs (fp32, and fp16 `-e cuda`) takes its
/// cache as a shared buffer (past 16 positions, present 16) and writes only the new
/// positions; the rest of `present` is whatever the allocator returned (two runs of one
/// onnxruntime Python session on io.npz differ there, by NaN in fp16). Only the first
/// `sequence length` positions (axis 2) are compared.
const UNINITIALISED: [(&str, &str); 4] = [
    ("ortgenai_gptoss_fp16_cuda", "present.0.key"),
    ("ortgenai_gptoss_fp16_cuda", "present.0.value"),
    ("ortgenai_gptoss_fp32", "present.0.key"),
    ("ortgenai_gptoss_fp32", "present.0.value"),
];

/// The written positions of a shared-buffer cache (see [`UNINITIALISED`]).
fn written(v: &Value, seq: usize) -> Value {
    match v {
        Value::F32(a) => Value::F32(a.slice_axis(ndarray::Axis(2), (0..seq).into()).to_owned()),
        other => other.clone(),
    }
}

fn inputs(m: &Model, dir: &std::path::Path) -> Vec<(String, Value)> {
    smoe_opt::calib::load_inputs(m, &smoe_opt::calib::Source::Npz(dir.join("io.npz")))
        .expect("io.npz inputs")
}

#[test]
fn every_segment_reproduces_the_whole_model_at_its_cuts() {
    let mut checked = 0;
    let mut skipped = Vec::new();
    for (name, dir) in models() {
        let model = Model::load(dir.join("model.onnx")).unwrap();
        let det = smoe_opt::moe::detect(&model.graph);
        let segmentation = cut(&model, &det).unwrap();
        let feed = inputs(&model, &dir);
        let (tol, chained_tol) = if half_precision(&dir) {
            (2e-3, 4e-3)
        } else {
            (1e-5, 1e-4)
        };
        let full = segmentation.instrumented(&model).unwrap();
        let Segmentation { segments, crossing } = segmentation;
        // The segments run in the runtime that ran the whole model (runtimes differ in
        // their kernels: onnxruntime's MatMulNBits at accuracy level 4 quantises its inputs).
        let (rt, reference) = match run_in(&full, &feed, &candidates(Runtime::Auto)) {
            Ok(r) => r,
            Err(e) => {
                // Some fixtures do not run anywhere on purpose (broken exports); only those
                // that the original itself cannot run are skipped.
                assert!(
                    run(&model, &feed).is_err(),
                    "{name}: the instrumented model fails where the original runs: {e}"
                );
                skipped.push(name);
                continue;
            }
        };
        // Outputs part of which the runtime leaves uninitialised: see UNINITIALISED.
        let seq = feed
            .iter()
            .find(|(k, _)| k == "input_ids")
            .map_or(0, |(_, v)| v.shape()[1]);
        let trim = |k: &str, v: &Value| {
            if UNINITIALISED.contains(&(name.as_str(), k)) {
                written(v, seq)
            } else {
                v.clone()
            }
        };
        let reference: HashMap<String, Value> = reference
            .iter()
            .map(|(k, v)| (k.clone(), trim(k, v)))
            .collect();
        assert!(
            segments.len() > det.blocks.len() || segments.iter().all(|s| s.block.is_some()),
            "{name}: {} segments for {} blocks",
            segments.len(),
            det.blocks.len()
        );
        for (b, s) in det.blocks.iter().zip(&segments) {
            assert_eq!(s.block.as_deref(), Some(b.name.as_str()), "{name}");
            assert!(
                s.outputs.iter().any(|p| p.name == b.output),
                "{name}: segment of {} does not write the block's output {}; it writes {:?}",
                b.name,
                b.output,
                s.outputs
            );
        }
        assert_eq!(
            segments.iter().map(|s| s.nodes).sum::<usize>(),
            model.graph.node_count(),
            "{name}: the segments do not hold every node exactly once"
        );
        // Each segment fed the whole model's tensors.
        let all: Vec<(String, Value)> = feed
            .iter()
            .cloned()
            .chain(reference.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect();
        for (i, s) in segments.iter().enumerate() {
            let out = run_in(&s.model, &all, &[rt])
                .map(|(_, v)| v)
                .unwrap_or_else(|e| panic!("{name}: segment {i} does not run: {e}"));
            for p in &s.outputs {
                let want = reference
                    .get(&p.wire)
                    .unwrap_or_else(|| panic!("{name}: no reference for {}", p.wire));
                close(
                    &name,
                    &format!("segment {i} output {}", p.wire),
                    &trim(&p.wire, &out[&p.wire]),
                    want,
                    tol,
                );
            }
        }
        // Chained from the model inputs alone.
        let mut values: HashMap<String, Value> = feed.iter().cloned().collect();
        for (i, s) in segments.iter().enumerate() {
            let given: Vec<(String, Value)> =
                values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let out = run_in(&s.model, &given, &[rt])
                .map(|(_, v)| v)
                .unwrap_or_else(|e| panic!("{name}: chained segment {i} does not run: {e}"));
            values.extend(out);
        }
        for (k, want) in &reference {
            close(
                &name,
                &format!("chained {k}"),
                &trim(k, &values[k]),
                want,
                chained_tol,
            );
        }
        assert!(crossing.iter().all(|c| reference.contains_key(&c.wire)));
        checked += 1;
    }
    eprintln!("checked {checked} models; the originals of {skipped:?} do not run");
    assert!(
        checked >= 40,
        "only {checked} models checked; skipped {skipped:?}"
    );
}

/// The element types segments declare at their cuts come from the graph's declarations or,
/// where a graph declares none (onnxruntime-genai's builder writes no value_info), from the
/// typing rules. The rules agree with every declaration the exporters (ONNX shape inference
/// in torch.onnx) wrote, on every committed model: inferred with the declarations removed.
#[test]
fn inferred_element_types_agree_with_the_exporters_declarations() {
    let mut compared = 0;
    for (name, dir) in models() {
        let model = Model::load(dir.join("model.onnx")).unwrap();
        let mut g = model.to_proto().graph.unwrap();
        let declared: HashMap<String, i32> = g
            .value_info
            .iter()
            .filter_map(|v| Some((v.name.clone()?, smoe_opt::ir::types::declared(v)?)))
            .collect();
        g.value_info.clear();
        let bare = smoe_opt::ir::Graph::from_proto(g, HashMap::new()).unwrap();
        let inferred = smoe_opt::ir::types::elem_types(&bare);
        for (k, want) in &declared {
            let got = inferred.get(k);
            assert_eq!(got, Some(want), "{name}: element type of '{k}'");
            compared += 1;
        }
    }
    eprintln!("{compared} declared element types compared");
    assert!(compared > 1000, "only {compared} declarations compared");
}

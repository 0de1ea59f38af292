//! tract runs what onnxruntime runs: every original export and every re-emitted model gives
//! the onnxruntime reference outputs of io.npz. Tolerance 1e-4 relative:
//! tract sums in a different order and uses its own exp/erf/tanh kernels (measured ≤ 1e-6).
#![cfg(feature = "tract")]
mod common;
use common::*;
use smoe_opt::runtime::tract::TractSession;
use smoe_opt::runtime::{read_npz, rel_err, Session};
use smoe_opt::Model;

fn run_tract(model: &Model, io: &[(String, smoe_opt::runtime::Value)]) -> Result<f32, String> {
    let mut s = TractSession::from_model(model).map_err(|e| e.to_string())?;
    let inputs: Vec<_> = io
        .iter()
        .filter(|(n, _)| s.inputs().contains(n))
        .cloned()
        .collect();
    let out = s.run(&inputs).map_err(|e| e.to_string())?;
    let mut worst = 0f32;
    for (name, v) in out {
        let r = &io
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or(format!("no reference for {name}"))?
            .1;
        worst = worst.max(rel_err(&v.to_f32(), &r.to_f32()));
    }
    Ok(worst)
}

/// Exports that are broken for all but their export-time input, with the reason: tract
/// compiles for any value of the data-dependent sizes, so it refuses them up front, while
/// onnxruntime runs io.npz and fails on other inputs (checked with its Python package).
const SHAPE_SPECIALISED: &[(&str, &str)] = &[(
    "switch_v4_ts",
    "each expert's [count, d] output is reshaped to a baked [d] (count was 1 at export); \
     onnxruntime fails too on any input where an expert gets another token count",
)];

#[test]
fn reemitted_models_run_in_tract() {
    let mut table = Vec::new();
    for (name, dir) in models() {
        let io = read_npz(&dir.join("io.npz")).unwrap();
        let mut model = Model::load(dir.join("model.onnx")).unwrap();
        let original = run_tract(&model, &io);
        let det = smoe_opt::moe::detect(&model.graph);
        let rewrites = smoe_opt::emit::reemit(&mut model, &det, Default::default()).unwrap();
        let complete = rewrites.iter().all(|r| r.rewritten);
        let reemitted = run_tract(&model, &io);
        table.push(format!(
            "{name:32} original: {:<12} re-emitted: {:?}",
            original
                .as_ref()
                .map(|e| format!("{e:.1e}"))
                .unwrap_or_else(|e| format!("fails ({})", &e[..e.len().min(60)])),
            reemitted
        ));
        // Every export made of standard ONNX ops runs in tract (onnxruntime's contrib ops,
        // e.g. com.microsoft.MoE, do not exist there).
        let standard = standard_ops(&Model::load(dir.join("model.onnx")).unwrap());
        match &original {
            Ok(e) => assert!(
                *e <= 1e-4,
                "{name}: tract original differs from onnxruntime by {e}"
            ),
            Err(e) if standard && !SHAPE_SPECIALISED.iter().any(|(n, _)| *n == name) => {
                panic!("{name}: tract cannot run the original: {e}")
            }
            Err(_) => {}
        }
        // The re-emitted blocks are standard ops: the model runs in tract unless the rest of
        // the graph has contrib ops (onnxruntime-genai's attention).
        if complete && standard_ops(&model) {
            let e = reemitted
                .unwrap_or_else(|e| panic!("{name}: re-emitted model fails in tract: {e}"));
            assert!(
                e <= 1e-4,
                "{name}: re-emitted model in tract differs by {e}"
            );
        }
    }
    eprintln!("{}", table.join("\n"));
}

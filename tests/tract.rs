//! tract runs what onnxruntime runs: every re-emitted model (and every original tract can
//! load) gives the onnxruntime reference outputs of io.npz. Tolerance 1e-4 relative:
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

/// Models whose original graph tract cannot run, outside any MoE block (so re-emission
/// cannot help), with the reason.
const TRACT_UNSUPPORTED: &[(&str, &str)] = &[(
    "mixtral_v5_dynamo",
    "the dynamo export's attention-mask And uses shape symbols tract resolves inconsistently",
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
        if let Ok(e) = original {
            assert!(
                e <= 1e-4,
                "{name}: tract original differs from onnxruntime by {e}"
            );
        }
        if TRACT_UNSUPPORTED.iter().any(|(n, _)| *n == name) {
            continue;
        }
        if complete {
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

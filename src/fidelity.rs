//! How far a rewritten model's outputs moved from the original's, measured by running both on
//! held-out inputs (never the samples the statistics were fitted on).
//!
//! Over every float output both models produce, on the positions that are not padding
//! (`attention_mask` = 0 rows are excluded when an output's leading dims are `[batch, seq]`,
//! or when it is `[batch·seq, H]`):
//! - `rel_l2` = ‖y' − y‖ / ‖y‖ over all those values;
//! - `cosine` = the mean over positions of cos(y'ᵢ, yᵢ) of the last-axis vectors;
//! - for language models (token-id input `input_ids`, a rank-3 output: next-token logits),
//!   `top1_agreement` (argmax equal) and `kl` = mean KL(p ‖ p') of the next-token distributions.
//!
//! The models run whole here, one at a time in the runtime, or segment by segment
//! ([`measure_segmented`]: never a whole model in a runtime, and each rewritten block's output
//! compared at its cut too).
use crate::calib::{slice, CalibOptions};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::{candidates, open_in, Runtime};
use crate::runtime::{Session, Value};
use ndarray::{ArrayD, Axis};

mod distance;
mod segmented;
pub(crate) use distance::Distance;
pub use segmented::{measure_segmented, measure_segmented_against, reference_segmented, Measure};
use serde::Serialize;

/// The measured distance between two models.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Fidelity {
    /// Runtime that ran both models.
    pub runtime: String,
    /// How the original was run (itself, or its exact re-emission when the runtime cannot run
    /// the exported graph).
    pub reference: String,
    /// Held-out samples.
    pub samples: usize,
    /// Positions compared (padding excluded).
    pub positions: usize,
    /// Outputs compared.
    pub outputs: Vec<String>,
    /// Relative L2 error of the outputs.
    pub rel_l2: f64,
    /// Mean per-position cosine similarity.
    pub cosine: f64,
    /// Next-token argmax agreement (language models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Mean KL divergence of next-token distributions, original ‖ rewritten (language models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// Measured segment by segment: how far each rewritten block's output moved from the
    /// original's at its cut (the rewritten model's own activations against the original's,
    /// so each figure includes the drift of the blocks before it). Empty when the whole
    /// models were run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockFidelity>,
}

/// How far one block's output moved, measured at its cut.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BlockFidelity {
    /// The block.
    pub block: String,
    /// Its output tensor.
    pub output: String,
    /// Relative L2 error of the block's output (padding excluded).
    pub rel_l2: f64,
    /// Mean per-position cosine similarity of the block's output.
    pub cosine: f64,
}

/// Runs a session over `data` in batches of `batch` samples; returns every batch's outputs.
fn run_all(
    s: &mut dyn Session,
    data: &[(String, Value)],
    run: &CalibOptions,
) -> Result<Vec<Vec<(String, Value)>>> {
    let batch = run.batch;
    let n = data.first().map_or(0, |(_, v)| v.shape()[0]);
    let bar = crate::progress::count_bar(run.progress, n as u64, "samples");
    bar.set_message(format!("measuring ({})", s.runtime()));
    let mut out = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(n);
        let feed: Vec<(String, Value)> = data
            .iter()
            .map(|(k, v)| (k.clone(), slice(v, start, end)))
            .collect();
        out.push(s.run(&feed)?);
        bar.set_position(end as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The original model's outputs on some samples, computed once and compared with several
/// written models by [`measure_against`] (the auto planner's plans).
pub struct Reference {
    rt: Runtime,
    outputs: Vec<Vec<(String, Value)>>,
    label: String,
}

/// Runs `original` on `data` — as exported, else its exact re-emission — in the first
/// runtime of `run.runtime` that can (`run`: runtime, batch, progress; no data source).
pub fn reference(
    original: &Model,
    det: &Detection,
    data: &[(String, Value)],
    run: &CalibOptions,
) -> Result<Reference> {
    let outputs_of = |m: &Model, r: Runtime| {
        open_in(
            m,
            r,
            #[cfg(feature = "ort")]
            run.ep,
        )
        .and_then(|mut s| run_all(s.as_mut(), data, run))
    };
    let mut last_err = None;
    for r in candidates(run.runtime) {
        match outputs_of(original, r) {
            Ok(outputs) => {
                return Ok(Reference {
                    rt: r,
                    outputs,
                    label: "original".into(),
                })
            }
            Err(e) => {
                let mut re = original.clone();
                crate::emit::reemit(&mut re, det, crate::emit::EmitForm::Portable)?;
                match outputs_of(&re, r) {
                    Ok(outputs) => {
                        return Ok(Reference {
                            rt: r,
                            outputs,
                            label: format!(
                                "exact re-emission of the original (the exported graph failed: {e})"
                            ),
                        })
                    }
                    Err(e2) => last_err = Some(e2),
                }
            }
        }
    }
    Err(crate::runtime::last_error(run.runtime, last_err))
}

/// Runs `written` on the reference's samples, in its runtime, and measures the distance.
pub fn measure_against(
    reference: &Reference,
    written: &Model,
    data: &[(String, Value)],
    run: &CalibOptions,
) -> Result<Fidelity> {
    let samples = data.first().map_or(0, |(_, v)| v.shape()[0]);
    let mut s = open_in(
        written,
        reference.rt,
        #[cfg(feature = "ort")]
        run.ep,
    )?;
    let out = run_all(s.as_mut(), data, run)?;
    let runtime = s.runtime().to_string();
    compare(
        data,
        &reference.outputs,
        &out,
        runtime,
        reference.label.clone(),
        samples,
    )
}

/// Runs `original` and `written` on `data` and measures the distance.
pub fn measure(
    original: &Model,
    det: &Detection,
    written: &Model,
    data: &[(String, Value)],
    run: &CalibOptions,
) -> Result<Fidelity> {
    let samples = data.first().map_or(0, |(_, v)| v.shape()[0]);
    if samples == 0 {
        return Err(Error::Data(
            "no held-out samples to measure fidelity on".into(),
        ));
    }
    let open = |m: &Model, r: Runtime| {
        open_in(
            m,
            r,
            #[cfg(feature = "ort")]
            run.ep,
        )
    };
    let mut last_err = None;
    for r in candidates(run.runtime) {
        let mut new = match open(written, r) {
            Ok(s) => s,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let new_out = match run_all(new.as_mut(), data, run) {
            Ok(o) => o,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        // One model in the runtime at a time: the written one is released before the
        // original is loaded.
        let runtime = new.runtime().to_string();
        drop(new);
        // The original as exported, else its exact re-emission (e.g. tract cannot run Switch's
        // boolean-mask reshapes; shape-specialised exports fail on other batch shapes).
        let direct = open(original, r).and_then(|mut s| run_all(s.as_mut(), data, run));
        let (ref_out, reference) = match direct {
            Ok(o) => (o, "original".to_string()),
            Err(e) => {
                let mut re = original.clone();
                crate::emit::reemit(&mut re, det, crate::emit::EmitForm::Portable)?;
                match open(&re, r).and_then(|mut s| run_all(s.as_mut(), data, run)) {
                    Ok(o) => (
                        o,
                        format!(
                            "exact re-emission of the original (the exported graph failed: {e})"
                        ),
                    ),
                    Err(e2) => {
                        last_err = Some(e2);
                        continue;
                    }
                }
            }
        };
        return compare(data, &ref_out, &new_out, runtime, reference, samples);
    }
    Err(crate::runtime::last_error(run.runtime, last_err))
}

fn compare(
    data: &[(String, Value)],
    a: &[Vec<(String, Value)>],
    b: &[Vec<(String, Value)>],
    runtime: String,
    reference: String,
    samples: usize,
) -> Result<Fidelity> {
    let mask: Option<ArrayD<f32>> = data
        .iter()
        .find(|(n, _)| n == "attention_mask")
        .map(|(_, v)| v.to_f32());
    let mut d = Distance::new(data.iter().any(|(n, _)| n == "input_ids"));
    let mut offset = 0usize;
    for (ba, bb) in a.iter().zip(b) {
        let rows = ba
            .first()
            .map_or(0, |(_, v)| v.shape().first().copied().unwrap_or(0));
        let m = mask
            .as_ref()
            .filter(|m| m.ndim() >= 1 && offset + rows <= m.shape()[0])
            .map(|m| {
                m.slice_axis(Axis(0), (offset..offset + rows).into())
                    .to_owned()
            });
        d.add(m.as_ref(), ba, bb)?;
        offset += rows;
    }
    d.finish(runtime, reference, samples)
}

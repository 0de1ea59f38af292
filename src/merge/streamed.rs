//! Merging in bounded memory: when the models run segment by segment, each layer is merged
//! (or pruned), written into the output and moved out of memory before the next layer's
//! experts are read. The budget across layers needs only the routing statistics; a layer's
//! plan needs only its own experts. The held-out fidelity is measured segment by segment
//! alongside, the rewritten segment reading the layer's moved weights. What is written and
//! measured is what the all-at-once path ([`super::plan`], then
//! [`crate::emit::merged::rewrite`] and [`crate::fidelity::measure_segmented`]) writes and
//! measures; only the memory differs: one layer's experts (and its merge's similarity
//! matrices) at a time instead of every layer's.
use super::{plan_each, LayerPlan, MergeOptions};
use crate::calib::{CalibOptions, CalibStats};
use crate::emit::{BlockRewrite, EmitForm};
use crate::error::{Error, Result};
use crate::fidelity::{Fidelity, Measure};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use crate::segment::flow::own_block;
use std::collections::HashMap;

/// What [`merge_by_segment`] wrote.
pub struct Written {
    /// Every layer's plan, its experts dropped (the reports stay).
    pub plans: Vec<LayerPlan>,
    /// What was written, block by block.
    pub rewrites: Vec<BlockRewrite>,
    /// The held-out fidelity (None without held-out samples).
    pub fidelity: Option<Fidelity>,
}

/// Merges `original`'s selected layers one at a time into `out` (a copy of `original`),
/// segment by segment, measuring `heldout` alongside.
#[allow(clippy::too_many_arguments)]
pub fn merge_by_segment(
    original: &Model,
    out: &mut Model,
    det: &Detection,
    stats: &CalibStats,
    opts: &MergeOptions,
    emit: EmitForm,
    heldout: &[(String, Value)],
    run: &CalibOptions,
) -> Result<Written> {
    let cut = crate::segment::cut(original, det)?;
    // Which segment holds each block (a block outside every segment cannot be written here).
    let segment_of: HashMap<&str, usize> = cut
        .segments
        .iter()
        .enumerate()
        .filter_map(|(s, seg)| seg.block.as_deref().map(|b| (b, s)))
        .collect();
    let mut measure = if heldout.first().is_some_and(|(_, v)| v.shape()[0] > 0) {
        Some(Measure::new(original, &cut, heldout, run)?)
    } else {
        None
    };
    let mut next = 0usize;
    // Segments before `upto` (whose blocks are not rewritten) are measured unchanged.
    let pass_through = |measure: &mut Option<Measure>, upto: usize, next: &mut usize| {
        while *next < upto {
            let seg = &cut.segments[*next];
            if let Some(m) = measure.as_mut() {
                m.step_unchanged(*next, seg, det)?;
            }
            original.release_mapped();
            *next += 1;
        }
        Ok::<(), Error>(())
    };
    let mut plans = Vec::new();
    let mut rewrites = Vec::new();
    plan_each(&original.graph, det, stats, opts, |mut plan| {
        let s = *segment_of
            .get(plan.block.as_str())
            .ok_or_else(|| Error::Graph {
                node: Some(plan.block.clone()),
                reason: "the block is in no segment".into(),
            })?;
        if s < next {
            return Err(Error::Graph {
                node: Some(plan.block.clone()),
                reason: "internal: blocks are not planned in graph order".into(),
            });
        }
        pass_through(&mut measure, s, &mut next)?;
        let seg = &cut.segments[s];
        let one = own_block(&seg.model, det, &plan.block)?;
        let full = det.only(&plan.block).ok_or_else(|| Error::Graph {
            node: Some(plan.block.clone()),
            reason: "the block to write is not among the detected blocks".into(),
        })?;
        let mine = std::slice::from_ref(&plan);
        let mut rewritten = measure
            .is_some()
            .then(|| {
                let mut r = seg.model.clone();
                crate::emit::merged::rewrite(&mut r, &one, mine, emit).map(|_| r)
            })
            .transpose()?;
        rewrites.extend(crate::emit::merged::rewrite(out, &full, mine, emit)?);
        out.spill()?;
        plan.experts.clear();
        plan.bases.clear();
        if let (Some(m), Some(r)) = (measure.as_mut(), rewritten.as_mut()) {
            crate::onnx::spill::Spill::share(out, r);
            m.step(s, seg, det, &one, Some(r))?;
        }
        drop(rewritten);
        original.release_mapped();
        next = s + 1;
        plans.push(plan);
        Ok(())
    })?;
    pass_through(&mut measure, cut.segments.len(), &mut next)?;
    Ok(Written {
        plans,
        rewrites,
        fidelity: measure.map(Measure::finish).transpose()?,
    })
}

//! The sequential refit on graph segments: the model is cut at its blocks
//! ([`crate::segment`]) and the calibration data flows through the segments one at a time,
//! twice — through the original segments (the reference activations) and through the
//! rewritten ones (what each later block really receives). Each block is refitted on its
//! segment alone, fed those two sets of values; the rewritten segment then produces the next
//! segment's inputs. No runtime ever holds more than one segment, and each segment runs a
//! fixed number of times (the whole-model refit ran the whole model twice per layer).
//! Activations between segments are kept on disk (`cache.rs`), one batch in memory at a
//! time, and deleted once no later segment reads them.
use crate::calib::{self, CalibOptions};
use crate::compress::{Alternative, LayerRecipe};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use crate::segment::flow::{own_block, Flow};
use std::collections::HashMap;

/// The refitted layers of `alt` (in `alt`'s order).
pub(super) fn refit_layers(
    model: &Model,
    det: &Detection,
    alt: &Alternative,
    opts: &CalibOptions,
    fit: &[(String, Value)],
    ro: super::RefitOptions,
    mut sink: Option<&mut super::Sink>,
) -> Result<Vec<Alternative>> {
    let super::RefitOptions { emit, family, .. } = ro;
    let cut = crate::segment::cut(model, det)?;
    let mut measure = match sink.as_deref() {
        Some(k) if k.heldout.first().is_some_and(|(_, v)| v.shape()[0] > 0) => Some(
            crate::fidelity::Measure::new(model, &cut, &k.heldout, opts)?,
        ),
        _ => None,
    };
    let mut reference = Flow::new(&cut, fit, opts.batch, 2)?;
    let mut current = Flow::new(&cut, fit, opts.batch, 2)?;
    let count = reference.batches();
    let none = Detection::default();
    let recipe_of: HashMap<&str, usize> = alt
        .recipes
        .iter()
        .enumerate()
        .map(|(i, r)| (r.block(), i))
        .collect();
    let mut layers: Vec<Option<Alternative>> = (0..alt.recipes.len()).map(|_| None).collect();
    let mut first = true;
    let last = cut.segments.len().saturating_sub(1);
    for (s, seg) in cut.segments.iter().enumerate() {
        let Some(&i) = seg.block.as_deref().and_then(|b| recipe_of.get(b)) else {
            // A segment whose block is not rewritten: both flows pass through it unchanged
            // (nothing reads the last segment's outputs).
            if s < last {
                reference.run(s, &seg.model, &none, opts)?;
                current.run(s, &seg.model, &none, opts)?;
            }
            if let Some(m) = measure.as_mut() {
                m.step_unchanged(s, seg, det)?;
            }
            model.release_mapped();
            continue;
        };
        let recipe: &LayerRecipe = &alt.recipes[i];
        let one = own_block(&seg.model, det, recipe.block())?;
        let layer = if first && !alt.plans.is_empty() {
            // The first block's inputs are the original's: its one-shot form stands.
            if s < last {
                reference.run(s, &seg.model, &one, opts)?;
            }
            super::one_shot_layer(alt, i)
        } else {
            let mut paired = calib::Paired::open_shared(&seg.model, &one, &one, opts)?;
            for k in 0..count {
                let out = paired.add(&current.feed(k)?, &reference.feed(k)?)?;
                reference.store(s, k, &out)?;
            }
            reference.advance(s)?;
            let stats = paired.finish("paired with the original model, segment by segment");
            crate::compress::replan(&seg.model.graph, &one, &stats, recipe, family)?
        };
        first = false;
        let mut layer = layer;
        if s < last || sink.is_some() {
            let mut rewritten = seg.model.clone();
            crate::emit::merged::rewrite(&mut rewritten, &one, &layer.plans, emit)?;
            if let Some(k) = sink.as_deref_mut() {
                // Written into the output and moved out of memory; the rewritten segment
                // reads the moved weights too, and only the layer's report is kept.
                let full = det.only(recipe.block()).ok_or_else(|| Error::Graph {
                    node: Some(recipe.block().to_string()),
                    reason: "the block to write is not among the detected blocks".into(),
                })?;
                let r = crate::emit::merged::rewrite(k.model, &full, &layer.plans, emit)?;
                k.rewrites.extend(r);
                k.model.spill()?;
                crate::onnx::spill::Spill::share(k.model, &mut rewritten);
                for p in &mut layer.plans {
                    p.experts.clear();
                    p.bases.clear();
                }
                model.release_mapped();
            }
            if s < last {
                current.run(s, &rewritten, &none, opts)?;
            }
            if let Some(m) = measure.as_mut() {
                m.step(s, seg, det, &one, Some(&rewritten))?;
            }
        }
        layers[i] = Some(layer);
        model.release_mapped();
    }
    if let Some(k) = sink {
        k.written = true;
        if let Some(m) = measure {
            k.fidelity = Some(m.finish()?);
        }
    }
    log::info!(
        "activations between segments: at most {:.1} MiB on disk per flow",
        reference.peak().max(current.peak()) as f64 / (1u64 << 20) as f64
    );
    layers
        .into_iter()
        .zip(&alt.recipes)
        .map(|(l, r)| {
            l.ok_or_else(|| Error::Graph {
                node: Some(r.block().to_string()),
                reason: "the block is in no segment".into(),
            })
        })
        .collect()
}

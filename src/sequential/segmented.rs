//! The sequential refit on graph segments: the model is cut at its blocks
//! ([`crate::segment`]) and the calibration data flows through the segments one at a time,
//! twice — through the original segments (the reference activations) and through the
//! rewritten ones (what each later block really receives). Each block is refitted on its
//! segment alone, fed those two sets of values; the rewritten segment then produces the next
//! segment's inputs. No runtime ever holds more than one segment, and each segment runs a
//! fixed number of times (the whole-model refit ran the whole model twice per layer).
//! Activations between segments are kept on disk (`cache.rs`), one batch in memory at a
//! time, and deleted once no later segment reads them.
use super::cache::ActivationCache;
use crate::calib::{self, slice, CalibOptions};
use crate::compress::{Alternative, Family, LayerRecipe};
use crate::emit::EmitForm;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use crate::segment::Segmentation;
use std::collections::HashMap;

/// The refitted layers of `alt` (in `alt`'s order).
pub(super) fn refit_layers(
    model: &Model,
    det: &Detection,
    alt: &Alternative,
    opts: &CalibOptions,
    fit: &[(String, Value)],
    emit: EmitForm,
    family: Family,
) -> Result<Vec<Alternative>> {
    let cut = crate::segment::cut(model, det)?;
    let batch = opts.batch.max(1);
    let samples = fit.first().map_or(0, |(_, v)| v.shape()[0]);
    let count = samples.div_ceil(batch);
    let mut reference = ActivationCache::new(count)?;
    let mut current = ActivationCache::new(count)?;
    for k in 0..count {
        let (start, end) = (k * batch, ((k + 1) * batch).min(samples));
        for (name, v) in fit {
            let v = slice(v, start, end);
            reference.put(k, name, &v)?;
            current.put(k, name, &v)?;
        }
    }
    let keep = Keep {
        inputs: fit.iter().map(|(k, _)| k.clone()).collect(),
        last_read: last_reads(&cut),
    };
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
                run_all(&seg.model, opts, &mut reference)?;
                run_all(&seg.model, opts, &mut current)?;
            }
            drop_dead(&mut reference, &keep, s)?;
            drop_dead(&mut current, &keep, s)?;
            continue;
        };
        let recipe: &LayerRecipe = &alt.recipes[i];
        let one = own_block(&seg.model, det, recipe.block())?;
        let layer = if first {
            // The first block's inputs are the original's: its one-shot form stands.
            if s < last {
                run_all(&seg.model, opts, &mut reference)?;
            }
            super::one_shot_layer(alt, i)
        } else {
            let mut paired = calib::Paired::open(&seg.model, &one, &seg.model, &one, &one, opts)?;
            for k in 0..count {
                let out = paired.add(&current.get(k)?, &reference.get(k)?)?;
                if s < last {
                    for (name, v) in &out {
                        reference.put(k, name, v)?;
                    }
                }
            }
            let stats = paired.finish("paired with the original model, segment by segment");
            crate::compress::replan(&seg.model.graph, &one, &stats, recipe, family)?
        };
        first = false;
        if s < last {
            let mut rewritten = seg.model.clone();
            crate::emit::merged::rewrite(&mut rewritten, &one, &layer.plans, emit)?;
            run_all(&rewritten, opts, &mut current)?;
        }
        drop_dead(&mut reference, &keep, s)?;
        drop_dead(&mut current, &keep, s)?;
        layers[i] = Some(layer);
    }
    log::info!(
        "activations between segments: at most {:.1} MiB on disk per flow",
        reference.peak.max(current.peak) as f64 / (1u64 << 20) as f64
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

/// The detection, in `segment`, of the whole model's block `name` (found by its output,
/// named as in the whole model: plans name their blocks).
fn own_block(segment: &Model, det: &Detection, name: &str) -> Result<Detection> {
    let missing = || Error::Graph {
        node: Some(name.to_string()),
        reason: "the block is not recognised in its own segment".into(),
    };
    let whole = det
        .blocks
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(missing)?;
    let found = crate::moe::detect(&segment.graph);
    let here = found
        .blocks
        .iter()
        .find(|b| b.output == whole.output)
        .ok_or_else(missing)?;
    let mut one = found.only(&here.name).ok_or_else(missing)?;
    one.blocks[0].name = name.to_string();
    Ok(one)
}

/// Runs `model` on every batch, adding its outputs to the batch's values.
fn run_all(model: &Model, opts: &CalibOptions, cache: &mut ActivationCache) -> Result<()> {
    let none = Detection::default();
    let mut session = calib::Resilient::open(model, &none, vec![], opts)?;
    for k in 0..cache.batches() {
        let out = session.run(&cache.get(k)?, &format!("batch {k}"))?;
        for (name, v) in &out {
            cache.put(k, name, v)?;
        }
    }
    Ok(())
}

/// For every crossing tensor and model input: the last segment that reads it.
fn last_reads(cut: &Segmentation) -> HashMap<String, usize> {
    let mut last = HashMap::new();
    for (s, seg) in cut.segments.iter().enumerate() {
        for p in &seg.inputs {
            last.insert(p.wire.clone(), s);
        }
    }
    last
}

/// Drops the values no segment after `s` reads (model inputs stay: the attention mask tells
/// which tokens are padding).
fn drop_dead(cache: &mut ActivationCache, keep: &Keep, s: usize) -> Result<()> {
    cache.retain(|name| {
        keep.inputs.contains(name) || keep.last_read.get(name).is_some_and(|&l| l > s)
    })
}

/// What [`drop_dead`] keeps.
struct Keep {
    /// The model inputs.
    inputs: std::collections::HashSet<String>,
    /// For every crossing tensor and model input: the last segment that reads it.
    last_read: HashMap<String, usize>,
}

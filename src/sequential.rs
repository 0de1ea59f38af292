//! The sequential pipeline (`--pipeline sequential`): a compression plan is chosen once on the
//! original model's activations (which form and how many bytes each layer gets), then each
//! layer in graph order is calibrated again on the model whose earlier layers are already
//! rewritten, and its form refitted on those activations — Grams, whitening, neuron scores
//! and merges see what the layer will really receive — with the ORIGINAL layer's outputs on
//! the original model's activations (the same tokens) as the targets of its least-squares
//! refits and errors: each layer absorbs part of the error of the layers before it instead
//! of compounding it.
use crate::calib::{self, CalibOptions};
use crate::compress::{Alternative, Family};
use crate::emit::EmitForm;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use serde::Serialize;

pub mod memory;
mod segmented;
pub use memory::Execution;

/// How layers are calibrated and fitted (`--pipeline`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, schemars::JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Pipeline {
    /// Both, measured end to end on the calibration samples that choose plans; the better is
    /// written (one-shot without such samples).
    #[default]
    Auto,
    /// Every layer fitted on the original model's activations.
    OneShot,
    /// Layer by layer, each fitted on the activations of the already rewritten earlier layers.
    Sequential,
}

/// How [`refit`] writes and where it may run.
#[derive(Debug, Clone, Copy)]
pub struct RefitOptions {
    /// Form of the rewritten blocks.
    pub emit: EmitForm,
    /// The plan's compression family.
    pub family: Family,
    /// Whether the whole model may be refitted when the segments fail (not when the model
    /// does not fit in memory run whole).
    pub whole_fallback: bool,
}

/// Where the sequential refit of a plan built in bounded memory writes as it goes (segment
/// by segment only): each refitted layer is written into `model` (the output, a copy of the
/// original) and its weights moved out of memory ([`Model::spill`]); the held-out data is
/// measured segment by segment alongside. Nothing of a layer but its report outlives its
/// segment.
pub struct Sink<'a> {
    /// The output model.
    pub model: &'a mut Model,
    /// Held-out data (none: no measurement).
    pub heldout: Vec<(String, Value)>,
    /// Whether every layer was written into `model` (false: the refit ran on the whole
    /// model, and the caller writes the plans).
    pub written: bool,
    /// The held-out fidelity, when measured.
    pub fidelity: Option<crate::fidelity::Fidelity>,
    /// What was written, block by block.
    pub rewrites: Vec<crate::emit::BlockRewrite>,
}

/// Refits `alt` layer by layer on `model` (the original): for each of its layers in graph
/// order, calibrate that layer on the model with the earlier layers rewritten, rebuild the
/// layer's form from those statistics, and rewrite it. The first layer keeps its one-shot
/// form (its inputs are the original's) unless `alt` has recipes only, no built plans. Returns the refitted plan; its summary
/// keeps `alt`'s budget and family, with the new bytes, FLOPs and errors.
pub fn refit(
    model: &Model,
    det: &Detection,
    alt: &Alternative,
    calib: &CalibOptions,
    fit: &[(String, Value)],
    ro: RefitOptions,
    sink: Option<&mut Sink>,
) -> Result<Alternative> {
    let RefitOptions { emit, family, .. } = ro;
    // A plan of recipes only (the planner in bounded memory) builds its first layer too.
    if !alt.plans.is_empty() && alt.recipes.len() != alt.plans.len() {
        return Err(Error::Graph {
            node: None,
            reason: "internal: the plan has no per-layer recipes to refit".into(),
        });
    }
    // A test knob: the whole-model refit that the segment-by-segment one must agree with.
    let whole = std::env::var_os("SMOE_SEQUENTIAL_WHOLE_MODEL").is_some();
    let sink_given = sink.is_some();
    let segmented = if whole {
        Err(Error::Usage("SMOE_SEQUENTIAL_WHOLE_MODEL is set".into()))
    } else {
        segmented::refit_layers(model, det, alt, calib, fit, ro, sink)
    };
    let (layers, how) = match segmented {
        Ok(l) => (l, "segment by segment"),
        // A sink may hold some layers already: no fallback writes over them.
        Err(e) if (!ro.whole_fallback || sink_given) && !whole => return Err(e),
        Err(e) => {
            log::warn!("the segment-by-segment refit failed ({e}); refitting on the whole model");
            (
                whole_model_layers(model, det, alt, calib, fit, emit, family)?,
                "on the whole model",
            )
        }
    };
    let mut plans = Vec::new();
    let mut recipes = Vec::new();
    let mut summary = alt.summary.clone();
    summary.bytes_after = 0;
    summary.flops_after = 0.0;
    for i in graph_order(det, alt) {
        for p in &layers[i].plans {
            if let Some(c) = &p.compress {
                summary.bytes_after += c.bytes_after;
                summary.flops_after += c.flops_after;
            }
        }
        plans.extend(layers[i].plans.iter().cloned());
        recipes.push(alt.recipes[i].clone());
    }
    // Layers of the first step keep the one-shot's accounting.
    if summary.bytes_after > summary.budget_bytes + alt.recipes.len() as u64 {
        return Err(Error::Graph {
            node: None,
            reason: format!(
                "internal: the refitted plan stores {} bytes, over the budget of {}",
                summary.bytes_after, summary.budget_bytes
            ),
        });
    }
    summary.fraction = summary.bytes_after as f64 / summary.bytes_before.max(1) as f64;
    summary.plan = format!("{}; refitted layer by layer ({how})", alt.summary.plan);
    summary.pipeline = Pipeline::Sequential;
    summary.chosen_by = None;
    Ok(Alternative {
        plans,
        recipes,
        summary,
    })
}

/// Layer `i` of `alt` as fitted one-shot (the first layer's inputs are the original's either
/// way).
fn one_shot_layer(alt: &Alternative, i: usize) -> Alternative {
    Alternative {
        plans: vec![alt.plans[i].clone()],
        recipes: vec![alt.recipes[i].clone()],
        summary: alt.summary.clone(),
    }
}

/// The indices of `alt`'s layers in graph order: each layer's inputs depend on the layers
/// before it only.
fn graph_order(det: &Detection, alt: &Alternative) -> Vec<usize> {
    let mut order: Vec<usize> = (0..alt.recipes.len()).collect();
    order.sort_by_key(|&i| {
        det.blocks
            .iter()
            .position(|b| b.name == alt.recipes[i].block())
            .unwrap_or(usize::MAX)
    });
    order
}

/// The refitted layers of `alt` (in `alt`'s order), each calibrated on the whole model with
/// the earlier layers rewritten, paired with the whole original model: what runs when the
/// model cannot be cut into segments.
fn whole_model_layers(
    model: &Model,
    det: &Detection,
    alt: &Alternative,
    calib: &CalibOptions,
    fit: &[(String, Value)],
    emit: EmitForm,
    family: Family,
) -> Result<Vec<Alternative>> {
    let mut current = model.clone();
    let mut layers: Vec<Option<Alternative>> = (0..alt.recipes.len()).map(|_| None).collect();
    let mut done: Vec<&str> = Vec::new();
    for (step, i) in graph_order(det, alt).into_iter().enumerate() {
        let recipe = &alt.recipes[i];
        let one = det.only(recipe.block()).ok_or_else(|| Error::Graph {
            node: Some(recipe.block().to_string()),
            reason: "the block to refit is not among the detected blocks".into(),
        })?;
        // The first layer's inputs are the original's: its one-shot form stands.
        let layer = if step == 0 && !alt.plans.is_empty() {
            one_shot_layer(alt, i)
        } else {
            let rest = det.without(&done);
            let stats = calib::calibrate_paired(&current, model, &one, det, &rest, calib, fit)?;
            crate::compress::replan(&current.graph, &one, &stats, recipe, family)?
        };
        crate::emit::merged::rewrite(&mut current, &one, &layer.plans, emit)?;
        done.push(recipe.block());
        layers[i] = Some(layer);
    }
    layers
        .into_iter()
        .map(|l| {
            l.ok_or_else(|| Error::Graph {
                node: None,
                reason: "internal: a layer was not refitted".into(),
            })
        })
        .collect()
}

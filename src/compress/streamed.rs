//! The planner in bounded memory: one layer at a time. The global plans of a fixed family
//! (`low-rank`, `base-delta`: one rank allocation over every layer's matrices; `neurons`: one
//! fraction for every layer) need of each layer only its matrices' energy spectra and its
//! fixed costs — a few kilobytes — not its experts, Grams or factors. [`layer_spectrum`]
//! computes that summary from one layer's statistics (the caller drops the statistics and
//! the layer after it), and [`allocate`] turns the summaries into per-layer recipes (a form
//! at an element budget) that the sequential pipeline builds layer by layer. The allocation
//! is the one [`super::plan`] makes over all layers at once (same energies, same greedy), so
//! only the memory differs.
use super::{
    base_delta_parts, bases_elements, dense_cost, dense_flops, prepare_one, target_spectra,
    CompressOptions, CompressionSummary, Family, Form, LayerRecipe, TargetSize, Targets,
};
use crate::calib::CalibStats;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::moe::Detection;
use crate::passes::allocate_ranks::{allocate_ranks, MatrixEnergies};

/// What the global allocation needs of one layer.
#[derive(Debug, Clone)]
pub struct LayerSpectrum {
    block: String,
    /// Routed-expert elements of the layer.
    elements: usize,
    /// Elements stored whatever the ranks (biases; base + delta: the shared base too).
    fixed: usize,
    /// Energies of every factored matrix (target-major), empty for `neurons`.
    energies: Vec<MatrixEnergies>,
    /// Routed multiply-adds per token of the dense layer.
    flops: f64,
}

/// Whether [`layer_spectrum`] and [`allocate`] plan `opts` (a fixed family on float experts,
/// no merge first).
pub fn supports(opts: &CompressOptions) -> bool {
    matches!(
        opts.family,
        Family::LowRank | Family::BaseDelta | Family::Neurons
    ) && opts.merge.is_none()
}

/// The summary of block `block` (covered by `det` and `stats`) for `family`.
pub fn layer_spectrum(
    g: &Graph,
    det: &Detection,
    stats: &CalibStats,
    block: &str,
    family: Family,
) -> Result<LayerSpectrum> {
    let (data, _) = prepare_one(g, det, stats, block, "plan")?;
    let d = &data[0];
    if d.qcost.is_some() {
        return Err(Error::Usage(format!(
            "{block}: com.microsoft.QMoE layers are planned with every layer at once"
        )));
    }
    let t = Targets::new(d.identity());
    let bias = t.bias_elements();
    let (fixed, energies) = match family {
        Family::LowRank => {
            let (_, en) = target_spectra(d, &t);
            (bias, en.into_iter().flatten().collect())
        }
        Family::BaseDelta => {
            let parts = base_delta_parts(d, &t, None);
            (
                bias + bases_elements(&parts),
                parts.en.into_iter().flatten().collect(),
            )
        }
        _ => (bias, Vec::new()),
    };
    Ok(LayerSpectrum {
        block: block.to_string(),
        elements: dense_cost(d, &t),
        fixed,
        energies,
        flops: dense_flops(d),
    })
}

/// Per-layer recipes of `family` at `target` over `layers` (graph order), and the plan's
/// summary as far as it is known before the layers are built (budget, bytes and FLOPs
/// before; the sequential refit fills in what was stored).
pub fn allocate(
    layers: &[LayerSpectrum],
    family: Family,
    target: TargetSize,
) -> Result<(Vec<LayerRecipe>, CompressionSummary)> {
    let total: usize = layers.iter().map(|l| l.elements).sum();
    let budget = match target {
        TargetSize::Fraction(f) => (f * total as f64).floor() as usize,
        TargetSize::Bytes(b) => (b / 4) as usize,
    };
    let recipe = |l: &LayerSpectrum, form: Form| LayerRecipe {
        block: l.block.clone(),
        merge: None,
        form,
    };
    let (recipes, plan): (Vec<LayerRecipe>, String) = if budget >= total {
        (
            layers.iter().map(|l| recipe(l, Form::Dense)).collect(),
            "dense: everything fits the budget".into(),
        )
    } else if family == Family::Neurons {
        let frac = budget as f64 / total.max(1) as f64;
        (
            layers
                .iter()
                .map(|l| {
                    let b = (frac * l.elements as f64) as usize;
                    recipe(l, Form::Family(Family::Neurons, b))
                })
                .collect(),
            "neurons, one fraction for every layer".into(),
        )
    } else {
        let fixed: usize = layers.iter().map(|l| l.fixed).sum();
        let avail = budget
            .checked_sub(fixed)
            .ok_or_else(|| super::below_factored(family, budget))?;
        let flat: Vec<MatrixEnergies> = layers
            .iter()
            .flat_map(|l| l.energies.iter().cloned())
            .collect();
        let (ranks, _) = allocate_ranks(&flat, avail);
        let mut at = 0;
        let recipes = layers
            .iter()
            .map(|l| {
                let k = l.energies.len();
                let stored: usize = l
                    .energies
                    .iter()
                    .zip(&ranks[at..at + k])
                    .map(|(m, &r)| m.cost(r))
                    .sum();
                at += k;
                recipe(l, Form::Family(family, l.fixed + stored))
            })
            .collect();
        (
            recipes,
            format!("{}, global rank allocation", super::family_name(family)),
        )
    };
    let summary = CompressionSummary {
        family,
        plan: format!("{plan}, planned one layer at a time"),
        pipeline: crate::sequential::Pipeline::Sequential,
        budget_bytes: 4 * budget as u64,
        bytes_before: 4 * total as u64,
        bytes_after: 0,
        fraction: 0.0,
        flops_before: layers.iter().map(|l| l.flops).sum(),
        flops_after: 0.0,
        chosen_by: None,
    };
    Ok((recipes, summary))
}

//! A chosen layer form, built again from other statistics: the sequential pipeline plans every
//! layer once on the original model's activations, then refits each layer in order on the
//! activations of the model whose earlier layers are already rewritten (the same form and
//! byte budget, new Grams, refits and errors).
use super::{
    apply_base_delta, apply_family, base_delta_parts, base_groups, dense_built, finish,
    prepare_one, refit_merged, stored_elements, Alternative, Family, Targets,
};
use crate::calib::CalibStats;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::merge::{self, MergeOptions};
use crate::moe::Detection;

/// How one layer of a plan is built: an optional merge, then a form at an element budget.
#[derive(Debug, Clone)]
pub struct LayerRecipe {
    /// The block.
    pub(super) block: String,
    /// Merge to a number of experts first.
    pub(super) merge: Option<MergeSpec>,
    /// The form of the (merged) experts.
    pub(super) form: Form,
}

/// A merge of one layer.
#[derive(Debug, Clone)]
pub(super) struct MergeSpec {
    pub(super) opts: MergeOptions,
    pub(super) experts: usize,
    /// Merged down projections refitted to their members' routing-weighted outputs.
    pub(super) refit: bool,
}

/// The form of a layer's experts, at a budget in stored elements (biases included).
#[derive(Debug, Clone, Copy)]
pub(super) enum Form {
    /// As they are.
    Dense,
    /// A compression family.
    Family(Family, usize),
    /// Base + delta with one base per m-smoe group of `m`.
    GroupBase(usize, usize),
}

impl LayerRecipe {
    /// The block this recipe writes.
    pub fn block(&self) -> &str {
        &self.block
    }

    /// Whether the layer is written as it is (no merge, dense): nothing in it depends on
    /// statistics.
    pub fn is_identity(&self) -> bool {
        self.merge.is_none() && matches!(self.form, Form::Dense)
    }
}

/// Builds `recipe` for its block from `stats` (which must cover that block): a one-layer
/// plan. `family` is what the summary reports as asked for.
pub fn replan(
    g: &Graph,
    det: &Detection,
    stats: &CalibStats,
    recipe: &LayerRecipe,
    family: Family,
) -> Result<Alternative> {
    let (data, bpe) = prepare_one(g, det, stats, &recipe.block, "refit")?;
    let d = &data[0];
    let targets = match &recipe.merge {
        None => Targets::new(d.identity()),
        Some(m) => {
            let mut plan = merge::plan_layer(g, d.block, d.stats, m.experts, &m.opts)?;
            if m.refit {
                refit_merged(d, &mut plan);
            }
            Targets::new(plan)
        }
    };
    let merged = recipe
        .merge
        .as_ref()
        .map(|m| format!("merge {}", m.experts));
    let unfit = || Error::Graph {
        node: Some(recipe.block.clone()),
        reason: "the layer's form does not fit its budget with the new statistics".into(),
    };
    let mut built = match recipe.form {
        Form::Dense => dense_built(&targets, merged.clone().unwrap_or("dense".into())),
        Form::Family(f, b) => apply_family(d, &targets, f, b).ok_or_else(unfit)?,
        Form::GroupBase(m, b) => {
            let parts = base_delta_parts(d, &targets, Some(&base_groups(d, m)));
            b.checked_sub(targets.bias_elements())
                .and_then(|a| apply_base_delta(d, &targets, &parts, a))
                .ok_or_else(unfit)?
        }
    };
    if let (Some(m), Form::Family(..) | Form::GroupBase(..)) = (&merged, recipe.form) {
        built.family = format!("{m} + {}", built.family);
    }
    let budget = stored_elements(d, &built);
    finish(
        &data,
        std::slice::from_ref(&targets),
        vec![built],
        "refitted on the rewritten earlier layers".into(),
        family,
        budget,
        bpe,
    )
}

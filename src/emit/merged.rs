//! Writing reduced (merged or pruned) MoE layers: only the new experts are stored.
//!
//! Portable form (default) computes the exact MC-SMoE semantics (mc-smoe.md §5): top-k over
//! the ORIGINAL N router logits, a constant lookup N → M, the M merged experts; two chosen
//! experts of one group add their routing weights. Pruned layers keep only the kept router
//! rows, so top-k chooses among the kept experts.
//! `--emit ort-fused` writes onnxruntime's `com.microsoft.MoE` where the block fits it: pruned
//! and unmerged layers exactly; merged layers with the router-merging variant (one logit per
//! group, `log Σ exp`, top-k over groups), which is not the exact semantics — each block's
//! `semantics` says which was written.
use super::builder::Emitter;
use super::portable::{self, Target, TargetFfn};
use super::{built, fused, prune_dead, splice, BlockRewrite, EmitForm};
use crate::error::{Error, Result};
use crate::merge::LayerPlan;
use crate::model::Model;
use crate::moe::Detection;

/// Exact merged semantics (portable form).
pub const EXACT: &str = "exact: top-k over the original router experts, lookup to merged experts";
/// Pruned semantics.
pub const PRUNED: &str = "pruned: top-k over the kept router rows";
/// Router-merging variant of the fused op.
pub const GROUP_LSE: &str =
    "router-merging: top-k over group logits log-sum-exp(z_i, i in group) (approximate)";

/// Rewrites every planned block of `model`.
pub fn rewrite(
    model: &mut Model,
    det: &Detection,
    plans: &[LayerPlan],
    form: EmitForm,
) -> Result<Vec<BlockRewrite>> {
    let opset = model.default_opset();
    let mut out = Vec::new();
    let mut fused_used = false;
    for plan in plans {
        let block = det
            .blocks
            .iter()
            .find(|b| b.name == plan.block)
            .ok_or_else(|| Error::Usage(format!("no block {}", plan.block)))?;
        let mut em = Emitter::new(&model.graph, &format!("smoe/{}", block.name), opset);
        let merged = plan.experts.iter().any(|e| e.ids.len() > 1);
        let dense: Option<Vec<_>> = plan.experts.iter().map(|e| e.ffn.as_dense()).collect();
        let fit = fused::unfit(block)
            .or_else(|| {
                dense.is_none().then(|| {
                    "compressed experts (low-rank, base+delta) have no com.microsoft.MoE form"
                        .to_string()
                })
            })
            .or_else(|| {
                (merged && block.router.top_k > plan.experts.len()).then(|| {
                    format!(
                        "top-{} over {} group logits is impossible",
                        block.router.top_k,
                        plan.experts.len()
                    )
                })
            });
        let mut skipped = None;
        let (logits, semantics) = match (form, fit) {
            (EmitForm::OrtFused, None) => {
                fused_used = true;
                let dense = dense.unwrap_or_default();
                let params: Vec<_> = dense.iter().collect();
                let groups: Vec<Vec<usize>> = plan.experts.iter().map(|e| e.ids.clone()).collect();
                let l = fused::emit_with(
                    &mut em,
                    block,
                    &params,
                    plan.router_rows.as_deref(),
                    merged.then_some(groups.as_slice()),
                )?;
                let sem = match (&plan.router_rows, merged) {
                    (Some(_), _) => PRUNED,
                    (None, true) => GROUP_LSE,
                    (None, false) => EXACT,
                };
                (l, sem)
            }
            (f, why) => {
                if let (EmitForm::OrtFused, Some(why)) = (f, why) {
                    log::warn!("{}: written in portable form: {why}", block.name);
                    skipped = Some(format!("portable: {why}"));
                }
                let targets: Vec<Target> = plan
                    .experts
                    .iter()
                    .map(|e| Target {
                        ffn: TargetFfn::Proj(&e.ffn, &plan.bases),
                        ids: e.ids.clone(),
                    })
                    .collect();
                let l = portable::emit(&mut em, block, &targets, plan.router_rows.as_deref())?;
                let sem = if plan.router_rows.is_some() {
                    PRUNED
                } else {
                    EXACT
                };
                (l, sem)
            }
        };
        let added = splice(model, block, built(em))?;
        out.push(BlockRewrite {
            block: block.name.clone(),
            rewritten: true,
            skipped,
            nodes_removed: block.nodes.len(),
            nodes_added: added,
            logits: Some(logits),
            semantics: Some(semantics.to_string()),
        });
    }
    if fused_used {
        model.import_opset("com.microsoft", 1);
    }
    prune_dead(model)?;
    Ok(out)
}

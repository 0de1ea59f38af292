//! Writing reduced (merged or pruned) MoE layers: only the new experts are stored.
//!
//! Portable form (default) computes the exact MC-SMoE semantics (docs/algorithm.md §5): top-k over
//! the ORIGINAL N router logits, a constant lookup N → M, the M merged experts; two chosen
//! experts of one group add their routing weights. Pruned layers keep only the kept router
//! rows, so top-k chooses among the kept experts.
//! `--emit ort-fused` (and `auto` for QMoE blocks) writes onnxruntime's `com.microsoft.MoE`/`QMoE`
//! where the block fits it: pruned and unmerged layers exactly; merged layers of plain softmax
//! routers with the router-merging variant (one logit per group, `log Σ exp`, top-k over
//! groups), which is not the exact semantics; merged layers of routers that choose themselves
//! (sigmoid, selection bias, groups) exactly — each block's `semantics` says which was written.
use super::portable::{Target, TargetFfn};
use super::{write_blocks, BlockRewrite, BlockWrite, EmitForm, Fused};
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

/// Rewrites every planned block of `model` (through the one block emitter).
pub fn rewrite(
    model: &mut Model,
    det: &Detection,
    plans: &[LayerPlan],
    form: EmitForm,
) -> Result<Vec<BlockRewrite>> {
    let mut items = Vec::new();
    for plan in plans {
        let block = det
            .blocks
            .iter()
            .find(|b| b.name == plan.block)
            .ok_or_else(|| Error::Usage(format!("no block {}", plan.block)))?;
        let merged = plan.experts.iter().any(|e| e.ids.len() > 1);
        let dense: Option<Vec<_>> = plan.experts.iter().map(|e| e.ffn.as_dense()).collect();
        let fused = match dense {
            None => Fused::Unfit(
                "compressed experts (low-rank, base+delta) have no com.microsoft.MoE form".into(),
            ),
            Some(_)
                if merged
                    && !super::fused::scattered(block)
                    && block.router.top_k > plan.experts.len() =>
            {
                Fused::Unfit(format!(
                    "top-{} over {} group logits is impossible",
                    block.router.top_k,
                    plan.experts.len()
                ))
            }
            Some(d) => Fused::Params(
                d,
                merged.then(|| plan.experts.iter().map(|e| e.ids.clone()).collect()),
            ),
        };
        let semantics = match (&plan.router_rows, merged) {
            (Some(_), _) => (PRUNED, PRUNED),
            // Scattered routers give the op their own choice: group log-sum-exps are then the
            // groups' summed weights, the exact semantics.
            (None, true) if super::fused::scattered(block) => (EXACT, EXACT),
            (None, true) => (EXACT, GROUP_LSE),
            (None, false) => (EXACT, EXACT),
        };
        items.push(BlockWrite {
            block,
            targets: plan
                .experts
                .iter()
                .map(|e| Target {
                    ffn: TargetFfn::Proj(&e.ffn, &plan.bases),
                    ids: e.ids.clone(),
                })
                .collect(),
            router_rows: plan.router_rows.as_deref(),
            fused,
            semantics: Some(semantics),
        });
    }
    write_blocks(model, items, form)
}

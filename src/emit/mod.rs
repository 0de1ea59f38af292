//! Rewriting detected MoE blocks into smoe-opt's own subgraphs.
pub mod builder;
pub mod fused;
#[cfg(feature = "tract")]
pub mod merged;
pub mod portable;

use crate::error::{Error, Result};
use crate::ir::{prune, Patch};
use crate::model::Model;
use crate::moe::Detection;
use builder::Emitter;
use portable::Target;
use serde::Serialize;

/// Which form replacement blocks take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EmitForm {
    /// Standard ONNX ops (runs in onnxruntime and tract, any batch/sequence length).
    #[default]
    Portable,
    /// onnxruntime's fused `com.microsoft.MoE` where the block's semantics fit it exactly
    /// (others stay portable, with the reason in the report).
    OrtFused,
}

/// What a rewrite did to one block.
#[derive(Debug, Clone, Serialize)]
pub struct BlockRewrite {
    /// Block name.
    pub block: String,
    /// Whether it was replaced.
    pub rewritten: bool,
    /// Why not (or why not in the requested form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Nodes removed and added.
    pub nodes_removed: usize,
    /// Nodes added.
    pub nodes_added: usize,
    /// The router-logits value of the new block.
    #[serde(skip)]
    pub logits: Option<String>,
    /// Which routing semantics the written block computes (reduced blocks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semantics: Option<String>,
}

/// The nodes and initializers an [`Emitter`] built.
pub(crate) type Built = (
    Vec<crate::onnx::proto::NodeProto>,
    Vec<crate::ir::Initializer>,
);

/// Takes what `em` built, releasing its borrow of the graph.
pub(crate) fn built(mut em: Emitter) -> Built {
    (std::mem::take(&mut em.nodes), std::mem::take(&mut em.inits))
}

/// Replaces `block`'s nodes by what an emitter built.
pub(crate) fn splice(
    model: &mut Model,
    block: &crate::moe::MoeBlock,
    built: Built,
) -> Result<usize> {
    let mut patch = Patch::new(format!("rewrite {}", block.name));
    for &id in &block.nodes {
        patch.remove_node(id);
    }
    let added = built.0.len();
    for n in built.0 {
        patch.add_node(n);
    }
    for i in built.1 {
        patch.add_initializer(i);
    }
    model.graph.apply(patch)?;
    Ok(added)
}

/// Removes what no output depends on any more (the replaced experts' weights).
pub(crate) fn prune_dead(model: &mut Model) -> Result<()> {
    let p = prune(&model.graph, "prune");
    if !p.is_empty() {
        model.graph.apply(p).map_err(|e| Error::Graph {
            node: None,
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Replaces every identified block of `det` by its canonical emission with the same
/// experts (`--method none`): outputs must not change.
pub fn reemit(model: &mut Model, det: &Detection, form: EmitForm) -> Result<Vec<BlockRewrite>> {
    let opset = model.default_opset();
    let mut out = Vec::new();
    let mut fused_used = false;
    for (block, &identified) in det.blocks.iter().zip(&det.identified) {
        if !identified || block.experts.len() < block.router.num_experts {
            let why = "experts missing from the export cannot be re-emitted exactly".to_string();
            log::warn!("{}: left unchanged: {why}", block.name);
            out.push(BlockRewrite {
                block: block.name.clone(),
                rewritten: false,
                skipped: Some(why),
                nodes_removed: 0,
                nodes_added: 0,
                logits: None,
                semantics: None,
            });
            continue;
        }
        let targets: Vec<Target> = block
            .experts
            .iter()
            .map(|e| Target {
                ffn: portable::TargetFfn::Described(&e.ffn),
                ids: vec![e.index],
            })
            .collect();
        let mut em = Emitter::new(&model.graph, &format!("smoe/{}", block.name), opset);
        let mut note = None;
        let logits = match (form, fused::unfit(block)) {
            (EmitForm::OrtFused, None) => {
                fused_used = true;
                fused::emit(&mut em, block)?
            }
            (EmitForm::OrtFused, Some(why)) => {
                log::warn!("{}: written in portable form: {why}", block.name);
                note = Some(format!("portable: {why}"));
                portable::emit(&mut em, block, &targets, None)?
            }
            (EmitForm::Portable, _) => portable::emit(&mut em, block, &targets, None)?,
        };
        let added = splice(model, block, built(em))?;
        out.push(BlockRewrite {
            block: block.name.clone(),
            rewritten: true,
            skipped: note,
            nodes_removed: block.nodes.len(),
            nodes_added: added,
            logits: Some(logits),
            semantics: None,
        });
    }
    if fused_used {
        model.import_opset("com.microsoft", 1);
    }
    prune_dead(model)?;
    Ok(out)
}

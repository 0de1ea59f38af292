//! Rewriting detected MoE blocks into smoe-opt's own subgraphs.
pub mod builder;
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
}

/// What a rewrite did to one block.
#[derive(Debug, Clone, Serialize)]
pub struct BlockRewrite {
    /// Block name.
    pub block: String,
    /// Whether it was replaced.
    pub rewritten: bool,
    /// Why not, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Nodes removed and added.
    pub nodes_removed: usize,
    /// Nodes added.
    pub nodes_added: usize,
}

/// Replaces every identified block of `det` by its canonical emission with the same
/// experts (`--method none`): outputs must not change.
pub fn reemit(model: &mut Model, det: &Detection, form: EmitForm) -> Result<Vec<BlockRewrite>> {
    let EmitForm::Portable = form;
    let opset = model.default_opset();
    let mut out = Vec::new();
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
            });
            continue;
        }
        let targets: Vec<Target> = block
            .experts
            .iter()
            .map(|e| Target {
                ffn: &e.ffn,
                ids: vec![e.index],
            })
            .collect();
        let mut em = Emitter::new(&model.graph, &format!("smoe/{}", block.name), opset);
        portable::emit(&mut em, block, &targets)?;
        let mut patch = Patch::new(format!("reemit {}", block.name));
        for &id in &block.nodes {
            patch.remove_node(id);
        }
        let added = em.nodes.len();
        for n in std::mem::take(&mut em.nodes) {
            patch.add_node(n);
        }
        for i in std::mem::take(&mut em.inits) {
            patch.add_initializer(i);
        }
        model.graph.apply(patch)?;
        out.push(BlockRewrite {
            block: block.name.clone(),
            rewritten: true,
            skipped: None,
            nodes_removed: block.nodes.len(),
            nodes_added: added,
        });
    }
    let p = prune(&model.graph, "prune");
    if !p.is_empty() {
        model.graph.apply(p).map_err(|e| Error::Graph {
            node: None,
            reason: e.to_string(),
        })?;
    }
    Ok(out)
}

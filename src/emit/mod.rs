//! Rewriting detected MoE blocks into smoe-opt's own subgraphs.
pub mod builder;
pub mod fused;
pub mod merged;
pub mod portable;

use crate::error::{Error, Result};
use crate::ir::{prune, Patch};
use crate::model::Model;
use crate::moe::Detection;
use crate::passes::merge_experts::ExpertParams;
use builder::Emitter;
use portable::Target;
use serde::Serialize;

/// Which form replacement blocks take.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, schemars::JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum EmitForm {
    /// Portable, except that quantised `com.microsoft.QMoE` blocks stay QMoE (requantised in
    /// their own format; dequantised they would take 4–8× the bytes).
    #[default]
    Auto,
    /// Standard ONNX ops (runs in onnxruntime and tract, any batch/sequence length); QMoE
    /// blocks are dequantised to their float type.
    Portable,
    /// onnxruntime's fused `com.microsoft.MoE` where the block's semantics fit it exactly
    /// (others stay portable, with the reason in the report).
    OrtFused,
}

/// What a rewrite did to one block.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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
    /// QMoE blocks written as QMoE: the error requantisation added, against the original's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<fused::QuantReport>,
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

/// What the fused op can be given for one block.
pub(crate) enum Fused {
    /// The block's own experts (read from the graph when written).
    Own,
    /// New dense experts, with their groups when merged (router-merging variant).
    Params(Vec<ExpertParams>, Option<Vec<Vec<usize>>>),
    /// The fused op cannot hold this block: why.
    Unfit(String),
}

/// One block to write: the portable form's targets, what the fused op can take, and the
/// names of the semantics each form computes (None for exact re-emission).
pub(crate) struct BlockWrite<'a> {
    /// The block replaced.
    pub block: &'a crate::moe::MoeBlock,
    /// Portable targets.
    pub targets: Vec<Target<'a>>,
    /// Router rows kept (pruning).
    pub router_rows: Option<&'a [usize]>,
    /// Fused-op material.
    pub fused: Fused,
    /// (portable semantics, fused semantics).
    pub semantics: Option<(&'static str, &'static str)>,
}

/// The one block emitter: writes every item in `form` (portable where the fused op does not
/// fit, with the reason), splices it in place of the block, prunes what died.
pub(crate) fn write_blocks(
    model: &mut Model,
    items: Vec<BlockWrite>,
    form: EmitForm,
) -> Result<Vec<BlockRewrite>> {
    let opset = model.default_opset();
    let mut out = Vec::new();
    let mut fused_used = false;
    for item in items {
        let block = item.block;
        let mut em = Emitter::new(&model.graph, &format!("smoe/{}", block.name), opset);
        let unfit = fused::unfit(block).or(match &item.fused {
            Fused::Unfit(why) => Some(why.clone()),
            _ => None,
        });
        let mut skipped = None;
        let fused_wanted = match form {
            EmitForm::OrtFused => true,
            EmitForm::Auto => block.quant().is_some(),
            EmitForm::Portable => false,
        };
        let mut quantization = None;
        let (logits, semantics) = match (fused_wanted, unfit) {
            (true, None) => {
                fused_used = true;
                let (l, q) = match &item.fused {
                    Fused::Params(p, groups) => {
                        let refs: Vec<&ExpertParams> = p.iter().collect();
                        fused::emit_with(
                            &mut em,
                            block,
                            &refs,
                            item.router_rows,
                            groups.as_deref(),
                        )?
                    }
                    _ => fused::emit(&mut em, block)?,
                };
                quantization = q;
                (l, item.semantics.map(|s| s.1))
            }
            (wanted, why) => {
                if let (true, Some(why)) = (wanted, why) {
                    let what = if block.quant().is_some() {
                        "written dequantised in portable form"
                    } else {
                        "written in portable form"
                    };
                    log::warn!("{}: {what}: {why}", block.name);
                    skipped = Some(format!("portable: {why}"));
                }
                let l = portable::emit(&mut em, block, &item.targets, item.router_rows)?;
                (l, item.semantics.map(|s| s.0))
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
            semantics: semantics.map(str::to_string),
            quantization,
        });
    }
    if fused_used {
        model.import_opset("com.microsoft", 1);
    }
    prune_dead(model)?;
    Ok(out)
}

/// Replaces every identified block of `det` by its canonical emission with the same
/// experts (`--method none`): outputs must not change.
pub fn reemit(model: &mut Model, det: &Detection, form: EmitForm) -> Result<Vec<BlockRewrite>> {
    let mut skipped = Vec::new();
    let mut items = Vec::new();
    for (block, &identified) in det.blocks.iter().zip(&det.identified) {
        if !identified || block.experts.len() < block.router.num_experts {
            let why = "experts missing from the export cannot be re-emitted exactly".to_string();
            log::warn!("{}: left unchanged: {why}", block.name);
            skipped.push(BlockRewrite {
                block: block.name.clone(),
                rewritten: false,
                skipped: Some(why),
                nodes_removed: 0,
                nodes_added: 0,
                logits: None,
                semantics: None,
                quantization: None,
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
        items.push(BlockWrite {
            block,
            targets,
            router_rows: None,
            fused: Fused::Own,
            semantics: None,
        });
    }
    let mut out = write_blocks(model, items, form)?;
    out.extend(skipped);
    let order = |name: &str| det.blocks.iter().position(|b| b.name == name);
    out.sort_by_key(|r| order(&r.block));
    Ok(out)
}

//! Finds every MoE block of a graph: one recogniser per form, diagnostics for broken
//! exports, and the reason every near-miss was rejected.
use super::block::MoeBlock;
use super::consts::{const_ints, const_proto};
use super::view::View;
use super::{experts, fused, region, router};
use crate::ir::{node_label, Graph, NodeId};
use crate::onnx::dtype;
use serde::Serialize;
use std::collections::HashSet;

/// A selection node that looked like a router but was not recognised.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct NearMiss {
    /// The node (`name (op)`).
    pub node: String,
    /// Whether it looked like an MoE router (a TopK/ArgMax over router-MatMul scores).
    pub moe_like: bool,
    /// Why it was rejected.
    pub reason: String,
}

/// Everything detection found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Detection {
    /// Recognised blocks, in graph order.
    pub blocks: Vec<MoeBlock>,
    /// Problems users must know about (broken exports, unrecognised MoE-like nodes).
    pub diagnostics: Vec<String>,
    /// Every rejected candidate with its reason (`inspect --explain`).
    pub near_misses: Vec<NearMiss>,
    /// Per block: whether expert indices are known (false when a trace baked them).
    #[serde(skip)]
    pub identified: Vec<bool>,
}

impl Detection {
    /// The detection restricted to the identified block `name` (None when there is none).
    pub fn only(&self, name: &str) -> Option<Detection> {
        let i = self
            .blocks
            .iter()
            .zip(&self.identified)
            .position(|(b, &id)| id && b.name == name)?;
        Some(Detection {
            blocks: vec![self.blocks[i].clone()],
            diagnostics: vec![],
            near_misses: vec![],
            identified: vec![true],
        })
    }

    /// This detection less the blocks named in `names` (e.g. those already rewritten).
    pub fn without(&self, names: &[&str]) -> Detection {
        let (blocks, identified) = self
            .blocks
            .iter()
            .zip(&self.identified)
            .filter(|(b, _)| !names.contains(&b.name.as_str()))
            .map(|(b, &i)| (b.clone(), i))
            .unzip();
        Detection {
            blocks,
            diagnostics: vec![],
            near_misses: vec![],
            identified,
        }
    }

    /// The blocks whose experts are all identified (safe to calibrate and rewrite).
    pub fn identified_blocks(&self) -> Vec<&MoeBlock> {
        self.blocks
            .iter()
            .zip(&self.identified)
            .filter(|(_, &i)| i)
            .map(|(b, _)| b)
            .collect()
    }
}

/// Runs every recogniser over `g`.
pub fn detect(g: &Graph) -> Detection {
    let v = View::new(g);
    let mut det = Detection::default();
    let sels: Vec<NodeId> = g
        .nodes()
        .filter(|(_, n)| matches!(n.op_type.as_deref(), Some("TopK" | "ArgMax")))
        .map(|(id, _)| id)
        .collect();
    let stop: HashSet<NodeId> = sels.iter().copied().collect();
    let mut covered: HashSet<NodeId> = HashSet::new();
    let candidates: Vec<NodeId> = g
        .nodes()
        .filter(|(_, n)| {
            matches!(
                n.op_type.as_deref(),
                Some("TopK" | "ArgMax" | "MoE" | "QMoE")
            )
        })
        .map(|(id, _)| id)
        .collect();
    for id in candidates {
        if covered.contains(&id) {
            continue;
        }
        let n = v.node(id);
        let label = node_label(n);
        let name = format!("moe.{}", det.blocks.len());
        match (n.op_type.as_deref(), n.domain.as_deref()) {
            (Some(op @ ("MoE" | "QMoE")), Some("com.microsoft")) => {
                match fused::recognise(&v, id) {
                    Ok((mut block, _layout, notes)) => {
                        block.name = name;
                        block.expert_bytes = expert_bytes(g, &block);
                        for note in notes {
                            det.diagnostics.push(format!("{}: {note}", block.name));
                        }
                        det.identified.push(true);
                        det.blocks.push(block);
                    }
                    Err(reason) => {
                        det.diagnostics.push(format!(
                            "{label}: com.microsoft.{op} not recognised: {reason}"
                        ));
                        det.near_misses.push(NearMiss {
                            node: label,
                            moe_like: true,
                            reason,
                        });
                    }
                }
            }
            (Some("MoE" | "QMoE"), _) => {}
            _ => {
                if let Some((block, identified)) = routed_block(&v, id, &stop, name, &mut det) {
                    covered.extend(block.nodes.iter().copied());
                    det.identified.push(identified);
                    det.blocks.push(block);
                }
            }
        }
    }
    // The group top-ks of a group-limited router were tried (and rejected) as routers before
    // their block was found: they are part of it, not near-misses.
    let inside: HashSet<String> = covered.iter().map(|&id| node_label(v.node(id))).collect();
    det.near_misses.retain(|m| !inside.contains(&m.node));
    det.diagnostics.extend(baked_splits(&v));
    det
}

/// Recognises the block routed by selection node `sel`; records near-misses and diagnostics.
fn routed_block(
    v: &View,
    sel: NodeId,
    stop: &HashSet<NodeId>,
    name: String,
    det: &mut Detection,
) -> Option<(MoeBlock, bool)> {
    let label = node_label(v.node(sel));
    let found = match router::analyze(v, sel) {
        Ok(f) => f,
        Err(reason) => {
            let moe_like = reason.starts_with(router::INCONSISTENT);
            if moe_like {
                det.diagnostics
                    .push(format!("{label}: {reason}; the block is left unchanged"));
            }
            det.near_misses.push(NearMiss {
                node: label,
                moe_like,
                reason,
            });
            return None;
        }
    };
    let x = region::block_input(v, &found.x_in).to_string();
    let own;
    let stop = if found.inner.is_empty() {
        stop
    } else {
        own = stop
            .iter()
            .copied()
            .filter(|id| !found.inner.contains(id))
            .collect::<HashSet<_>>();
        &own
    };
    let result = region::close(v, &x, sel, stop).and_then(|reg| {
        let ex = experts::extract(v, &reg.nodes, &found, &x)?;
        Ok((reg, ex))
    });
    let (reg, ex) = match result {
        Ok(r) => r,
        Err(reason) => {
            det.diagnostics.push(format!(
                "{label}: looks like an MoE router ({} experts, top-{}) but the block was not recognised: {reason}",
                found.router.num_experts, found.router.top_k
            ));
            det.near_misses.push(NearMiss {
                node: label,
                moe_like: true,
                reason,
            });
            return None;
        }
    };
    let mut block = MoeBlock {
        name,
        form: ex.form,
        input: x,
        output: reg.output,
        router: found.router,
        experts: ex.experts,
        shared: ex.shared,
        nodes: reg.nodes,
        expert_bytes: 0,
    };
    block.expert_bytes = expert_bytes(v.g, &block);
    let n = block.router.num_experts;
    let present = block.experts.len();
    let identified = !(ex.specialised && present < n);
    if present < n {
        let which = if identified {
            let p = block.present();
            format!(
                "experts {:?} are missing",
                (0..n).filter(|e| !p.contains(e)).collect::<Vec<_>>()
            )
        } else {
            "which ones cannot be told: the trace bound each chain to an expert by position".into()
        };
        det.diagnostics.push(format!(
            "{}: the router scores {n} experts but the graph holds only {present}; {which}. A TorchScript trace \
             unrolls only the experts its example input hit, so this export gives wrong results for tokens routed \
             to the others: re-export with an input that hits every expert (or a loop over all experts)",
            block.name
        ));
    } else if ex.specialised {
        det.diagnostics.push(format!(
            "{}: expert chains are bound to experts through a Split whose sizes were baked in at export \
             (transformers `for expert_idx in expert_hit` traced by TorchScript): onnxruntime fails on inputs \
             that do not hit every expert",
            block.name
        ));
    }
    Some((block, identified))
}

/// Bytes of the routed experts' weights.
fn expert_bytes(g: &Graph, b: &MoeBlock) -> u64 {
    let elem = |t: &str| {
        const_proto(g, t)
            .and_then(|p| dtype::bits(p.data_type.unwrap_or(1)))
            .unwrap_or(32)
    };
    b.experts
        .iter()
        .map(|e| {
            let f = &e.ffn;
            match (f.up.quant.as_ref(), f.down.quant.as_ref()) {
                (Some(qa), Some(qd)) => {
                    // Codes, one scale per row and block, biases in the scales' type.
                    let sb = elem(&qa.scales);
                    let w = |w: &crate::moe::WeightRef, q: &crate::moe::quant::Quant| {
                        let [o, i] = w.shape;
                        (o * i) as u64 * u64::from(q.bits) + (o * q.blocks(i)) as u64 * sb
                    };
                    let weights: u64 =
                        f.gate.as_ref().map_or(0, |gw| w(gw, qa)) + w(&f.up, qa) + w(&f.down, qd);
                    let biases = f.params()
                        - f.gate.as_ref().map_or(0, |w| w.shape[0] * w.shape[1])
                        - f.up.shape[0] * f.up.shape[1]
                        - f.down.shape[0] * f.down.shape[1];
                    (weights + biases as u64 * sb).div_ceil(8)
                }
                _ => (f.params() as u64 * elem(&f.up.tensor)).div_ceil(8),
            }
        })
        .sum()
}

/// `Split` nodes with constant sizes on the data-dependent axis of a `NonZero` result:
/// the export works only for inputs with exactly the count seen at export time.
fn baked_splits(v: &View) -> Vec<String> {
    let mut out = Vec::new();
    for (id, n) in v.g.nodes() {
        if n.op_type.as_deref() != Some("Split") {
            continue;
        }
        let axis = v.attr_int(id, "axis").unwrap_or(0);
        let sizes = if n.input.len() > 1 && !n.input[1].is_empty() {
            const_ints(v.g, &n.input[1])
        } else {
            v.attr_ints(id, "split").filter(|s| !s.is_empty())
        };
        let Some(sizes) = sizes else { continue };
        // NonZero output is [rank, count]; a Transpose(perm [1,0]) makes it [count, rank].
        let mut src = n.input[0].as_str();
        let mut count_axis = 1;
        while let Some((p, op)) = v.producer(src) {
            match op {
                "Transpose" if v.attr_ints(p, "perm").as_deref() == Some(&[1, 0]) => {
                    count_axis = 1 - count_axis;
                    src = v.input(p, 0);
                }
                "Cast" | "Identity" => src = v.input(p, 0),
                _ => break,
            }
        }
        if v.producer(src).is_some_and(|(_, op)| op == "NonZero") && axis == count_axis {
            out.push(format!(
                "{}: splits a data-dependent NonZero count into fixed sizes {sizes:?} baked in at export; the model \
                 fails (or computes garbage) on inputs with a different count",
                node_label(n)
            ));
        }
    }
    out
}

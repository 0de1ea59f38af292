//! onnxruntime's fused `com.microsoft.MoE` as an emission target (`--emit ort-fused`).
//!
//! Written only where the block's semantics fit the op exactly as onnxruntime's CPU kernel
//! (≥ 1.23) computes it: softmax over all N logits then top-k, optional renormalisation,
//! every expert present, activation relu / silu / identity / tanh-GELU, or SwiGLU (plain,
//! or gpt-oss's with alpha, beta and limit; written interleaved, `swiglu_fusion = 1`), no
//! Switch capacity.
//! Weights are stacked `[N, out, in]`; alpha, beta and fusion are always written.
//! Shared experts are emitted beside the op in standard ops.
use super::builder::Emitter;
use super::portable;
use crate::error::{Error, Result};
use crate::ir::builder::{attr_float, attr_int, attr_string};
use crate::moe::weights::expert_params;
use crate::moe::{Act, MoeBlock, Scoring};
use crate::passes::merge_experts::ExpertParams;

/// Why a block cannot be written as the fused op (None when it can).
pub fn unfit(block: &MoeBlock) -> Option<String> {
    let r = &block.router;
    if r.scoring != Scoring::Softmax {
        return Some("the fused op scores with softmax over all experts only".into());
    }
    if r.capacity.is_some() {
        return Some("the fused op has no expert capacity".into());
    }
    if r.selection_bias.is_some() || r.groups.is_some() || r.scale != 1.0 {
        return Some("the fused op has no selection bias, expert groups or routed scaling".into());
    }
    if block.experts.len() != r.num_experts {
        return Some("experts are missing".into());
    }
    let f = &block.experts[0].ffn;
    match (f.gate.is_some(), f.act) {
        (true, Act::Silu | Act::SwigluClamped { .. }) => None,
        (true, _) => Some("only SwiGLU is supported among gated activations".into()),
        (false, Act::Gelu) => Some(
            "the CPU kernel's gelu is the tanh approximation; this block uses exact gelu".into(),
        ),
        (false, _) => None,
    }
}

/// Emits `block` as router MatMul + `com.microsoft.MoE` (+ shared experts) with its own
/// experts. Returns the router-logits value.
pub fn emit(em: &mut Emitter, block: &MoeBlock) -> Result<String> {
    let mut experts = Vec::with_capacity(block.experts.len());
    for e in &block.experts {
        experts.push(expert_params(em.graph(), &e.ffn)?);
    }
    let refs: Vec<&ExpertParams> = experts.iter().collect();
    emit_with(em, block, &refs, None, None)
}

/// Emits `block` as the fused op over `experts` (canonical weights). `router_rows`: router
/// rows kept (pruning; the op then routes among them exactly). `groups`: router-merging
/// variant — the op sees one logit per group, `log Σ_{i∈G} exp(z_i)` (the group's softmax
/// mass), and takes its top-k over groups: NOT the exact merged semantics (which takes top-k
/// over the original N experts), so the report names it.
pub fn emit_with(
    em: &mut Emitter,
    block: &MoeBlock,
    experts: &[&ExpertParams],
    router_rows: Option<&[usize]>,
    groups: Option<&[Vec<usize>]>,
) -> Result<String> {
    if let Some(why) = unfit(block) {
        return Err(Error::Graph {
            node: Some(block.name.clone()),
            reason: format!("cannot emit as com.microsoft.MoE: {why}"),
        });
    }
    em.float = portable::block_float(em.graph(), block)?;
    let r = &block.router;
    let n = experts.len();
    if r.top_k > n {
        return Err(Error::Graph {
            node: Some(block.name.clone()),
            reason: format!(
                "the fused op's top-{} needs at least {} experts",
                r.top_k, r.top_k
            ),
        });
    }
    let h = block.hidden();
    let f0 = &block.experts[0].ffn;
    let inter = f0.intermediate();
    let gated = f0.gate.is_some();
    let rows1 = if gated { 2 * inter } else { inter };
    let mut fc1 = Vec::with_capacity(n * rows1 * h);
    let mut fc2 = Vec::with_capacity(n * h * inter);
    let mut b1 = Vec::new();
    let mut b2 = Vec::new();
    let has_b1 = f0.up_bias.is_some() || f0.gate_bias.is_some();
    let has_b2 = f0.down_bias.is_some();
    for e in experts {
        let up = e.up.as_slice().expect("standard layout");
        let ub = e.up_bias.as_ref().map_or(vec![0.0; inter], |b| b.to_vec());
        if let Some(gm) = &e.gate {
            // Interleaved rows: g0, u0, g1, u1, …
            let gm = gm.as_slice().expect("standard layout");
            let gb = e
                .gate_bias
                .as_ref()
                .map_or(vec![0.0; inter], |b| b.to_vec());
            for i in 0..inter {
                fc1.extend_from_slice(&gm[i * h..(i + 1) * h]);
                fc1.extend_from_slice(&up[i * h..(i + 1) * h]);
                b1.push(gb[i]);
                b1.push(ub[i]);
            }
        } else {
            fc1.extend_from_slice(up);
            b1.extend_from_slice(&ub);
        }
        fc2.extend(e.down.iter().copied());
        if let Some(b) = &e.down_bias {
            b2.extend(b.iter().copied());
        }
    }
    let x2 = em.reshape(&block.input, &[-1, h as i64]);
    let logits = portable::router_logits(em, block, &x2, router_rows)?;
    let logits_out = logits.clone();
    let logits = match groups {
        None => logits,
        Some(groups) => {
            let parts: Vec<String> = groups
                .iter()
                .map(|m| {
                    let ids: Vec<i64> = m.iter().map(|&i| i as i64).collect();
                    let ix = em.ints("group", &[ids.len() as i64], &ids);
                    let z = em.op("Gather", &[&logits, &ix], vec![attr_int("axis", 1)]);
                    em.reduce("ReduceLogSumExp", &z, &[-1], true)
                })
                .collect();
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            em.op("Concat", &refs, vec![attr_int("axis", 1)])
        }
    };
    let w1 = em.floats("fc1", &[n as i64, rows1 as i64, h as i64], &fc1);
    let w2 = em.floats("fc2", &[n as i64, h as i64, inter as i64], &fc2);
    let b1n = if has_b1 {
        em.floats("fc1_bias", &[n as i64, rows1 as i64], &b1)
    } else {
        String::new()
    };
    let b2n = if has_b2 {
        em.floats("fc2_bias", &[n as i64, h as i64], &b2)
    } else {
        String::new()
    };
    let act = match (gated, f0.act) {
        (true, _) => "swiglu",
        (false, Act::Relu) => "relu",
        (false, Act::Silu) => "silu",
        (false, Act::GeluTanh) => "gelu",
        (false, _) => "identity",
    };
    let (alpha, beta, limit) = match f0.act {
        Act::SwigluClamped { alpha, beta, limit } => (alpha, beta, limit),
        _ => (1.0, 0.0, None),
    };
    let mut attrs = vec![
        attr_int("k", r.top_k as i64),
        attr_string("activation_type", act),
        attr_int("normalize_routing_weights", i64::from(r.renormalize)),
        attr_int("swiglu_fusion", i64::from(gated)),
        attr_float("activation_alpha", alpha),
        attr_float("activation_beta", beta),
    ];
    if let Some(l) = limit {
        attrs.push(attr_float("swiglu_limit", l));
    }
    attrs.sort_by(|a, b| a.name.cmp(&b.name));
    let routed = em.op("MoE", &[&x2, &logits, &w1, &b1n, &w2, &b2n], attrs);
    em.nodes.last_mut().expect("just added").domain = Some("com.microsoft".into());
    let mut acc = routed;
    for s in &block.shared {
        let out = portable::shared_expert(em, s, &x2)?;
        acc = em.op("Add", &[&acc, &out], vec![]);
    }
    let shape_x = em.op("Shape", &[&block.input], vec![]);
    em.op_into("Reshape", &[&acc, &shape_x], &block.output, vec![]);
    Ok(logits_out)
}

//! onnxruntime's fused `com.microsoft.MoE` as an emission target (`--emit ort-fused`).
//!
//! Written only where the block's semantics fit the op exactly as onnxruntime's CPU kernel
//! (≥ 1.23) computes it: softmax over all N logits then top-k, optional renormalisation,
//! every expert present, activation relu / silu / identity / tanh-GELU, or SwiGLU with
//! standard alpha 1, beta 0 (written interleaved, `swiglu_fusion = 1`), no Switch capacity.
//! Weights are stacked `[N, out, in]`; alpha, beta and fusion are always written.
//! Shared experts are emitted beside the op in standard ops.
use super::builder::Emitter;
use super::portable;
use crate::error::{Error, Result};
use crate::ir::builder::{attr_float, attr_int, attr_string};
use crate::moe::weights::{matrix, vector};
use crate::moe::{Act, MoeBlock, Scoring};

/// Why a block cannot be written as the fused op (None when it can).
pub fn unfit(block: &MoeBlock) -> Option<String> {
    let r = &block.router;
    if r.scoring != Scoring::Softmax {
        return Some("the fused op scores with softmax over all experts only".into());
    }
    if r.capacity.is_some() {
        return Some("the fused op has no expert capacity".into());
    }
    if block.experts.len() != r.num_experts {
        return Some("experts are missing".into());
    }
    let f = &block.experts[0].ffn;
    match (f.gate.is_some(), f.act) {
        (true, Act::Silu) => None,
        (true, _) => Some("only SwiGLU is supported among gated activations".into()),
        (false, Act::Gelu) => Some(
            "the CPU kernel's gelu is the tanh approximation; this block uses exact gelu".into(),
        ),
        (false, _) => None,
    }
}

/// Emits `block` as router MatMul + `com.microsoft.MoE` (+ shared experts). Returns the
/// router-logits value.
pub fn emit(em: &mut Emitter, block: &MoeBlock) -> Result<String> {
    if let Some(why) = unfit(block) {
        return Err(Error::Graph {
            node: Some(block.name.clone()),
            reason: format!("cannot emit as com.microsoft.MoE: {why}"),
        });
    }
    let g = em.graph();
    let r = &block.router;
    let n = r.num_experts;
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
    for e in &block.experts {
        let f = &e.ffn;
        let up = matrix(g, &f.up)?;
        let ub = match &f.up_bias {
            Some(b) => vector(g, b)?,
            None => vec![0.0; inter],
        };
        if let Some(gw) = &f.gate {
            // Interleaved rows: g0, u0, g1, u1, …
            let gm = matrix(g, gw)?;
            let gb = match &f.gate_bias {
                Some(b) => vector(g, b)?,
                None => vec![0.0; inter],
            };
            for i in 0..inter {
                fc1.extend_from_slice(&gm[i * h..(i + 1) * h]);
                fc1.extend_from_slice(&up[i * h..(i + 1) * h]);
                b1.push(gb[i]);
                b1.push(ub[i]);
            }
        } else {
            fc1.extend_from_slice(&up);
            b1.extend_from_slice(&ub);
        }
        fc2.extend(matrix(g, &f.down)?);
        if let Some(b) = &f.down_bias {
            b2.extend(vector(g, b)?);
        }
    }
    let x2 = em.reshape(&block.input, &[-1, h as i64]);
    let wr = portable::router_weight(em, block)?;
    let mut logits = em.op("MatMul", &[&x2, &wr], vec![]);
    if let Some(b) = &r.bias {
        let bv = vector(g, b)?;
        let bn = em.floats("router_bias", &[n as i64], &bv);
        logits = em.op("Add", &[&logits, &bn], vec![]);
    }
    let logits_out = logits.clone();
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
    let mut attrs = vec![
        attr_int("k", r.top_k as i64),
        attr_string("activation_type", act),
        attr_int("normalize_routing_weights", i64::from(r.renormalize)),
        attr_int("swiglu_fusion", i64::from(gated)),
        attr_float("activation_alpha", 1.0),
        attr_float("activation_beta", 0.0),
    ];
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

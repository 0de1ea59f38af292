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
use crate::moe::quant::Quant;
use crate::moe::weights::expert_params;
use crate::moe::{Act, MoeBlock, Scoring};
use crate::onnx::proto::tensor_proto::DataType;
use crate::passes::merge_experts::ExpertParams;

/// Whether the op must be given scattered log-scores (the choice is not the op's own
/// softmax-then-top-k): sigmoid scores, a selection bias or expert groups.
pub(crate) fn scattered(block: &MoeBlock) -> bool {
    let r = &block.router;
    r.scoring == Scoring::Sigmoid || r.selection_bias.is_some() || r.groups.is_some()
}

/// Why a block cannot be written as the fused op (None when it can).
pub fn unfit(block: &MoeBlock) -> Option<String> {
    let r = &block.router;
    if r.capacity.is_some() {
        return Some("the fused op has no expert capacity".into());
    }
    if r.scoring == Scoring::Sparsemixer {
        return Some(
            "onnxruntime's CPU kernel has no sparse mixer (use_sparse_mixer is CUDA-only)".into(),
        );
    }
    if scattered(block) && !r.renormalize {
        return Some(
            "the fused op normalises the chosen experts' weights; this router's are not \
             renormalised"
                .into(),
        );
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

/// The error of a QMoE block written as QMoE: what requantising the written experts added,
/// against the rounding error the original quantisation already carries.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct QuantReport {
    /// Bits of fc1 (gate/up) and fc2 (down).
    pub bits: [u32; 2],
    /// Inputs per scale block (0: one per row).
    pub block_size: usize,
    /// The original's rounding error, relative RMS over its expert weights (nominal: a uniform
    /// error of one step per element, `scale²/12`).
    pub original_rel_rms: f64,
    /// The error requantisation added to the written experts, relative RMS (measured: the
    /// written codes dequantised against the weights they encode; 0 for unchanged experts).
    pub added_rel_rms: f64,
}

/// Σ scale²·count/12 (the nominal rounding noise) over one stacked QMoE tensor of `cols` inputs.
fn nominal_noise(g: &crate::ir::Graph, q: &Quant, cols: usize) -> f64 {
    let Some(s) = crate::moe::consts::const_floats(g, &q.scales) else {
        return 0.0;
    };
    let (nb, width) = (q.blocks(cols), if q.block == 0 { cols } else { q.block });
    s.iter()
        .enumerate()
        .map(|(i, &x)| {
            let b = i % nb;
            let count = width.min(cols - b * width);
            f64::from(x) * f64::from(x) * count as f64 / 12.0
        })
        .sum()
}

/// Emits `block` as router MatMul + `com.microsoft.MoE`/`QMoE` (+ shared experts) with its
/// own experts. Returns the router-logits value.
pub fn emit(em: &mut Emitter, block: &MoeBlock) -> Result<(String, Option<QuantReport>)> {
    let mut experts = Vec::with_capacity(block.experts.len());
    for e in &block.experts {
        experts.push(expert_params(em.graph(), &e.ffn)?);
    }
    let refs: Vec<&ExpertParams> = experts.iter().collect();
    emit_with(em, block, &refs, None, None)
}

/// The op's logits input. Plain softmax routers give their logits (softmax after top-k is
/// the op's renormalised softmax). Otherwise the experts are chosen here as the block
/// chooses them (sigmoid or softmax scores, selection bias, expert groups) and the op is
/// given `log s` of the chosen scores scattered into a matrix of large negatives: its
/// softmax over them is `s_i / Σ_chosen s`, the renormalised weights. With `groups`
/// (merging), each group's logit is the log-sum-exp of its members' — the summed weight of
/// its chosen members, exactly the merged semantics.
fn op_logits(
    em: &mut Emitter,
    block: &MoeBlock,
    logits: &str,
    rows: Option<&[usize]>,
    groups: Option<&[Vec<usize>]>,
) -> Result<String> {
    let r = &block.router;
    let float = em.float;
    let mut at = logits.to_string();
    let f32t = DataType::Float as i32;
    if scattered(block) {
        // Chosen in float32 (as onnxruntime-genai does), cast back for the op.
        em.float = f32t;
        if float != f32t {
            at = em.op("Cast", &[&at], vec![attr_int("to", f32t as i64)]);
        }
        let scores = match r.scoring {
            Scoring::Sigmoid => em.op("Sigmoid", &[&at], vec![]),
            _ => em.op("Softmax", &[&at], vec![attr_int("axis", -1)]),
        };
        let choice = portable::choice_scores(em, block, &scores, rows)?;
        let k = em.ints("k", &[1], &[r.top_k as i64]);
        let top = em.op_multi("TopK", &[&choice, &k], 2, portable::topk_attrs());
        let chosen = em.op(
            "GatherElements",
            &[&scores, &top[1]],
            vec![attr_int("axis", 1)],
        );
        let tiny = em.floats("tiny", &[], &[f32::MIN_POSITIVE]);
        let clipped = em.op("Clip", &[&chosen, &tiny], vec![]);
        let logs = em.op("Log", &[&clipped], vec![]);
        let fill = em.filled_like(&scores, -1e30);
        at = em.op(
            "ScatterElements",
            &[&fill, &top[1], &logs],
            vec![attr_int("axis", 1)],
        );
    }
    if let Some(groups) = groups {
        let parts: Vec<String> = groups
            .iter()
            .map(|m| {
                let ids: Vec<i64> = m.iter().map(|&i| i as i64).collect();
                let ix = em.ints("group", &[ids.len() as i64], &ids);
                let z = em.op("Gather", &[&at, &ix], vec![attr_int("axis", 1)]);
                em.reduce("ReduceLogSumExp", &z, &[-1], true)
            })
            .collect();
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        at = em.op("Concat", &refs, vec![attr_int("axis", 1)]);
    }
    if em.float != float {
        // float16: large negatives saturate to the type's lowest, still weight 0.
        let fill = em.floats("lowest", &[], &[-65504.0]);
        at = em.op("Max", &[&at, &fill], vec![]);
        em.float = float;
        at = em.op("Cast", &[&at], vec![attr_int("to", float as i64)]);
    }
    Ok(at)
}

/// The experts' stacked fc1 (`[n, rows1, h]`, SwiGLU interleaved) and fc2 (`[n, h, inter]`)
/// weights and biases; experts with fewer intermediate neurons are padded with zero neurons
/// (a zero down column adds nothing, whatever the activation), as is an odd count when the
/// down codes pack two per byte.
struct Stacked {
    inter: usize,
    rows1: usize,
    fc1: Vec<f32>,
    fc2: Vec<f32>,
    b1: Option<Vec<f32>>,
    b2: Option<Vec<f32>>,
}

fn stack(experts: &[&ExpertParams], h: usize, even: bool) -> Stacked {
    let mut inter = experts.iter().map(|e| e.up.nrows()).max().unwrap_or(0);
    if even && inter % 2 == 1 {
        inter += 1;
    }
    let gated = experts.first().is_some_and(|e| e.gate.is_some());
    let rows1 = if gated { 2 * inter } else { inter };
    let has_b1 = experts
        .iter()
        .any(|e| e.up_bias.is_some() || e.gate_bias.is_some());
    let has_b2 = experts.iter().any(|e| e.down_bias.is_some());
    let n = experts.len();
    let mut fc1 = vec![0f32; n * rows1 * h];
    let mut fc2 = vec![0f32; n * h * inter];
    let mut b1 = vec![0f32; n * rows1];
    let mut b2 = vec![0f32; n * h];
    for (x, e) in experts.iter().enumerate() {
        let ie = e.up.nrows();
        let w1 = &mut fc1[x * rows1 * h..(x + 1) * rows1 * h];
        let bb1 = &mut b1[x * rows1..(x + 1) * rows1];
        let (step, up_at) = if gated { (2, 1) } else { (1, 0) };
        for i in 0..ie {
            // Interleaved rows when gated: g0, u0, g1, u1, …
            let r = i * step + up_at;
            w1[r * h..(r + 1) * h]
                .iter_mut()
                .zip(e.up.row(i))
                .for_each(|(d, s)| *d = *s);
            bb1[r] = e.up_bias.as_ref().map_or(0.0, |b| b[i]);
            if let Some(g) = &e.gate {
                let r = i * 2;
                w1[r * h..(r + 1) * h]
                    .iter_mut()
                    .zip(g.row(i))
                    .for_each(|(d, s)| *d = *s);
                bb1[r] = e.gate_bias.as_ref().map_or(0.0, |b| b[i]);
            }
        }
        let w2 = &mut fc2[x * h * inter..(x + 1) * h * inter];
        for o in 0..h {
            for i in 0..ie {
                w2[o * inter + i] = e.down[[o, i]];
            }
        }
        if let Some(b) = &e.down_bias {
            b2[x * h..(x + 1) * h]
                .iter_mut()
                .zip(b)
                .for_each(|(d, s)| *d = *s);
        }
    }
    Stacked {
        inter,
        rows1,
        fc1,
        fc2,
        b1: has_b1.then_some(b1),
        b2: has_b2.then_some(b2),
    }
}

/// Stacked weights as QMoE codes and scales (in the original scales' type).
fn quantized(
    em: &mut Emitter,
    hint: &str,
    q: &Quant,
    w: &[f32],
    [n, rows, cols]: [usize; 3],
    err: &mut [f64; 2],
) -> Result<(String, String)> {
    let sdt = crate::moe::consts::const_proto(em.graph(), &q.scales)
        .and_then(|t| t.data_type)
        .unwrap_or(DataType::Float as i32);
    let mut codes = Vec::with_capacity(n * rows * cols / q.pack());
    let mut scales = Vec::with_capacity(n * rows * q.blocks(cols));
    for x in 0..n {
        let part = &w[x * rows * cols..(x + 1) * rows * cols];
        let (c, s) = q.quantize(part, rows, cols, |v| crate::ir::builder::round_to(v, sdt));
        for (a, b) in part.iter().zip(q.dequantize(&c, &s, rows, cols)) {
            err[0] += f64::from(a - b).powi(2);
            err[1] += f64::from(*a).powi(2);
        }
        codes.extend(c);
        scales.extend(s);
    }
    let (n, r) = (n as i64, rows as i64);
    let c = em.bytes(hint, &[n, r, (cols / q.pack()) as i64], codes);
    let sdims: Vec<i64> = if q.block == 0 {
        vec![n, r]
    } else {
        vec![n, r, q.blocks(cols) as i64]
    };
    let s = em.floats_as(&format!("{hint}_scales"), &sdims, &scales, sdt);
    Ok((c, s))
}

/// Emits `block` as the fused op over `experts` (canonical weights): `com.microsoft.QMoE`
/// with requantised weights in the block's own format when the block is quantised,
/// `com.microsoft.MoE` otherwise. `router_rows`: router rows kept (pruning; the op then
/// routes among them exactly). `groups`: merged experts — each group's logit is its
/// members' log-sum-exp (exact for scattered routers, see `op_logits`; for plain softmax
/// routers the top-k is then taken over groups, not over the original experts, and the
/// report names it).
pub fn emit_with(
    em: &mut Emitter,
    block: &MoeBlock,
    experts: &[&ExpertParams],
    router_rows: Option<&[usize]>,
    groups: Option<&[Vec<usize>]>,
) -> Result<(String, Option<QuantReport>)> {
    if let Some(why) = unfit(block) {
        return Err(Error::Graph {
            node: Some(block.name.clone()),
            reason: format!("cannot emit as com.microsoft.MoE: {why}"),
        });
    }
    em.float = portable::block_float(em.graph(), block)?;
    let r = &block.router;
    let n = experts.len();
    // A self-choosing router's merged groups: at most min(k, groups) have weight.
    let op_k = if scattered(block) && groups.is_some() {
        r.top_k.min(n)
    } else {
        r.top_k
    };
    if op_k > n {
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
    let gated = f0.gate.is_some();
    let quant = block.quant().map(|[a, d]| [a.clone(), d.clone()]);
    let st = stack(
        experts,
        h,
        quant.as_ref().is_some_and(|[_, d]| d.pack() > 1),
    );
    let (inter, rows1) = (st.inter, st.rows1);
    let x2 = em.reshape(&block.input, &[-1, h as i64]);
    let logits = portable::router_logits(em, block, &x2, router_rows)?;
    let logits_out = logits.clone();
    let logits = op_logits(em, block, &logits, router_rows, groups)?;
    let b1n = match &st.b1 {
        Some(b) => em.floats("fc1_bias", &[n as i64, rows1 as i64], b),
        None => String::new(),
    };
    let b2n = match &st.b2 {
        Some(b) => em.floats("fc2_bias", &[n as i64, h as i64], b),
        None => String::new(),
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
        attr_int("k", op_k as i64),
        attr_string("activation_type", act),
        attr_int(
            "normalize_routing_weights",
            i64::from(r.renormalize || r.scoring == Scoring::SoftmaxAfterTopk),
        ),
        attr_int("swiglu_fusion", i64::from(gated)),
        attr_float("activation_alpha", alpha),
        attr_float("activation_beta", beta),
    ];
    if let Some(l) = limit {
        attrs.push(attr_float("swiglu_limit", l));
    }
    let mut report = None;
    let routed = match &quant {
        None => {
            let w1 = em.floats("fc1", &[n as i64, rows1 as i64, h as i64], &st.fc1);
            let w2 = em.floats("fc2", &[n as i64, h as i64, inter as i64], &st.fc2);
            attrs.sort_by(|a, b| a.name.cmp(&b.name));
            em.op("MoE", &[&x2, &logits, &w1, &b1n, &w2, &b2n], attrs)
        }
        Some([q1, q2]) => {
            let mut err = [0.0; 2];
            let (w1, s1) = quantized(em, "fc1", q1, &st.fc1, [n, rows1, h], &mut err)?;
            let (w2, s2) = quantized(em, "fc2", q2, &st.fc2, [n, h, inter], &mut err)?;
            // The original's nominal rounding noise against its dequantised weights.
            let g = em.graph();
            let orig_inter = block.intermediate();
            let noise = nominal_noise(g, q1, h) + nominal_noise(g, q2, orig_inter);
            let mut energy = 0.0;
            for e in &block.experts {
                let p = expert_params(g, &e.ffn)?;
                for m in [p.gate.as_ref(), Some(&p.up), Some(&p.down)]
                    .into_iter()
                    .flatten()
                {
                    energy += m.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>();
                }
            }
            let rel = |a: f64, b: f64| if b > 0.0 { (a / b).sqrt() } else { 0.0 };
            report = Some(QuantReport {
                bits: [q1.bits, q2.bits],
                block_size: q1.block,
                original_rel_rms: rel(noise, energy),
                added_rel_rms: rel(err[0], err[1]),
            });
            attrs.push(attr_int("expert_weight_bits", i64::from(q1.bits)));
            if q1.bits != q2.bits {
                attrs.push(attr_int("fc1_expert_weight_bits", i64::from(q1.bits)));
                attrs.push(attr_int("fc2_expert_weight_bits", i64::from(q2.bits)));
            }
            if q1.block > 0 {
                attrs.push(attr_int("block_size", q1.block as i64));
            }
            attrs.sort_by(|a, b| a.name.cmp(&b.name));
            em.op(
                "QMoE",
                &[&x2, &logits, &w1, &s1, &b1n, &w2, &s2, &b2n],
                attrs,
            )
        }
    };
    em.nodes.last_mut().expect("just added").domain = Some("com.microsoft".into());
    let routed = if r.scale != 1.0 {
        let c = em.floats("routed_scaling", &[], &[r.scale]);
        em.op("Mul", &[&routed, &c], vec![])
    } else {
        routed
    };
    let mut acc = routed;
    for s in &block.shared {
        let out = portable::shared_expert(em, s, &x2)?;
        acc = em.op("Add", &[&acc, &out], vec![]);
    }
    let shape_x = em.op("Shape", &[&block.input], vec![]);
    em.op_into("Reshape", &[&acc, &shape_x], &block.output, vec![]);
    Ok((logits_out, report))
}

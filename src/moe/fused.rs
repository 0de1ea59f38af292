//! onnxruntime's fused `com.microsoft.MoE`: attributes and weight layouts.
//!
//! The op takes router LOGITS (it applies softmax over all N itself), fc1/fc2(/fc3)
//! weights stacked `[N, out, in]` (onnxruntime ≥ 1.23) or `[N, in, out]` (1.18–1.22). The
//! layout is told from the hidden size the router's MatMul fixes.
use super::block::{Act, BiasRef, Expert, Ffn, Form, MoeBlock, Router, RowSel, Scoring, WeightRef};
use super::consts::{const_dims, is_const};
use super::quant::Quant;
use super::view::View;
use crate::ir::NodeId;

/// Which weight layout a fused block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `[N, out, in]` (onnxruntime ≥ 1.23).
    OutIn,
    /// `[N, in, out]` (onnxruntime 1.18–1.22).
    InOut,
}

/// What feeds the fused op when experts are chosen by biased sigmoid scores (LFM2).
struct BiasedChoice<'v> {
    /// The raw router logits the sigmoid reads.
    scores: &'v str,
    /// The selection bias constant.
    bias: String,
    /// The nodes only the op uses (scatter of log σ into the fill matrix).
    nodes: Vec<NodeId>,
}

/// `ScatterElements(ConstantOfShape(Shape(σ), −big), TopK(σ + b).indices,
/// Log(Clip(GatherElements(σ, indices))))` with σ = sigmoid(logits) (or
/// `1/(1 + exp(−logits))`), as onnxruntime-genai writes LFM2's router. `None` when the op's
/// logits are not scattered.
fn biased_sigmoid_choice<'v>(
    v: &'v View,
    logits: &str,
    k: i64,
) -> Result<Option<BiasedChoice<'v>>, String> {
    // float16 builders cast the scattered f32 logits to the op's type.
    let mut casts = Vec::new();
    let mut at = logits;
    while let Some((c, "Cast" | "Identity")) = v.producer(at) {
        casts.push(c);
        at = v.input(c, 0);
    }
    let Some((sc, "ScatterElements")) = v.producer(at) else {
        return Ok(None);
    };
    let bad = |what: &str| Err(format!("scattered router logits: {what}"));
    let (fill, idx, upd) = (v.input(sc, 0), v.input(sc, 1), v.input(sc, 2));
    let Some((cs, "ConstantOfShape")) = v.producer(fill) else {
        return bad("the filled matrix is not a ConstantOfShape");
    };
    match v.attr_tensor_f32(cs, "value") {
        Some(x) if x <= -1e3 => {}
        _ => return bad("the fill value is not a large negative"),
    }
    let Some((topk, "TopK")) = v.producer(idx) else {
        return bad("the scattered indices are not a TopK's");
    };
    if super::consts::const_scalar_int(v.g, v.input(topk, 1)) != Some(k) {
        return bad("the TopK's k differs from the op's k");
    }
    let Some((add, "Add")) = v.producer(v.input(topk, 0)) else {
        return bad("the choice is not scores plus a bias");
    };
    let (a, b) = (v.input(add, 0), v.input(add, 1));
    let (sig, bias) = if is_const(v.g, b) { (a, b) } else { (b, a) };
    if !is_const(v.g, bias) {
        return bad("the choice adds two computed values");
    }
    let scores = sigmoid_input(v, sig).ok_or("scattered router logits: no sigmoid")?;
    // updates: Log(Clip(GatherElements(σ, indices)))
    let mut nodes = casts;
    nodes.extend([sc, cs]);
    if let Some((sh, "Shape")) = v.producer(v.input(cs, 0)) {
        nodes.push(sh);
    }
    let mut at = upd;
    loop {
        match v.producer(at) {
            Some((p, "Log" | "Clip" | "Cast")) => {
                nodes.push(p);
                at = v.input(p, 0);
            }
            Some((p, "GatherElements")) if v.input(p, 0) == sig && v.input(p, 1) == idx => break,
            _ => return bad("the scattered values are not log σ of the chosen experts"),
        }
    }
    Ok(Some(BiasedChoice {
        scores,
        bias: bias.to_string(),
        nodes,
    }))
}

/// The input of a sigmoid: `Sigmoid(x)` or `Reciprocal(Add(Exp(Neg(x)), 1))`.
fn sigmoid_input<'v>(v: &'v View, s: &str) -> Option<&'v str> {
    match v.producer(s)? {
        (p, "Sigmoid") => Some(v.input(p, 0)),
        (r, "Reciprocal") => {
            let (add, _) = v.producer(v.input(r, 0)).filter(|(_, op)| *op == "Add")?;
            let (a, b) = (v.input(add, 0), v.input(add, 1));
            let (e, one) = if is_const(v.g, b) { (a, b) } else { (b, a) };
            if super::consts::const_scalar_float(v.g, one) != Some(1.0) {
                return None;
            }
            let (exp, _) = v.producer(e).filter(|(_, op)| *op == "Exp")?;
            let (neg, _) = v.producer(v.input(exp, 0)).filter(|(_, op)| *op == "Neg")?;
            Some(v.input(neg, 0))
        }
        _ => None,
    }
}

/// Where a fused op's fc1/fc2/fc3 weights, scales and biases are among its inputs.
struct Slots {
    /// Weight inputs of fc1, fc2, fc3.
    w: [usize; 3],
    /// QMoE: the scale inputs and the quantisation of fc1, fc2, fc3.
    scales: Option<([usize; 3], [Quant; 3])>,
    /// Bias inputs of fc1, fc2, fc3.
    bias: [usize; 3],
}

/// The inputs and quantisation of a `com.microsoft.QMoE` node: `x, logits, w1, s1, b1, w2,
/// s2, b2, w3, s3, b3, zp1, zp2, zp3, router_weights`. Only the integer format without zero
/// points, in onnxruntime's raw `[N, out, in/pack]` layout, is read.
fn qmoe_slots(v: &View, id: NodeId) -> Result<Slots, String> {
    for i in 11..v.node(id).input.len() {
        if !v.input(id, i).is_empty() {
            return Err(format!(
                "QMoE input {i} ({}) is given: explicit zero points and router weights are not \
                 supported",
                if i == 14 {
                    "router_weights"
                } else {
                    "zero points"
                }
            ));
        }
    }
    if let Some(t) = v.attr_str(id, "quant_type").filter(|t| t != "int") {
        return Err(format!(
            "QMoE quant_type '{t}' (CUDA-only floating-point codes) is not supported"
        ));
    }
    if v.attr_int(id, "weights_prepacked").is_some_and(|p| p != 0) {
        return Err(
            "QMoE weights are CUTLASS-prepacked for CUDA (weights_prepacked); build the model \
             for the CPU provider, or with weights_prepacked=0"
                .into(),
        );
    }
    let bits = v.attr_int(id, "expert_weight_bits").unwrap_or(4);
    let block = v.attr_int(id, "block_size").unwrap_or(0);
    if block < 0 {
        return Err(format!("QMoE block_size {block} is negative"));
    }
    let scales = [3usize, 6, 9];
    let mut q = Vec::new();
    for (f, name) in ["fc1", "fc2", "fc3"].iter().enumerate() {
        let b = v
            .attr_int(id, &format!("{name}_expert_weight_bits"))
            .unwrap_or(bits);
        if b != 4 && b != 8 {
            return Err(format!(
                "QMoE {name} has {b}-bit weights; 4 and 8 are supported"
            ));
        }
        let s = v.input(id, scales[f]);
        if f < 2 && (s.is_empty() || !is_const(v.g, s)) {
            return Err(format!("QMoE {name} scales are not a constant"));
        }
        let signed = !s.is_empty()
            && super::consts::const_floats(v.g, s)
                .ok_or(format!("QMoE {name} scales are not floating point"))?
                .iter()
                .any(|&x| x < 0.0);
        q.push(Quant {
            scales: s.to_string(),
            bits: b as u32,
            block: block as usize,
            signed,
        });
    }
    let q: [Quant; 3] = q.try_into().expect("three");
    Ok(Slots {
        w: [2, 5, 8],
        scales: Some((scales, q)),
        bias: [4, 7, 10],
    })
}

/// Recognises one `com.microsoft.MoE` or `com.microsoft.QMoE` node. Returns the block, its layout and notes.
pub fn recognise(v: &View, id: NodeId) -> Result<(MoeBlock, Layout, Vec<String>), String> {
    let mut notes = Vec::new();
    let x = v.input(id, 0);
    let logits = v.input(id, 1);
    // Builders put a Reshape to [-1, N] (and casts) between the router and the op, and
    // add the router bias as a separate Add.
    let mut nodes = Vec::new();
    let mut at = logits;
    let mut bias_t = None;
    // LFM2: the op is given log σ of the experts chosen by σ + expert bias, scattered into
    // a matrix of large negatives; its softmax then gives σ_i / Σ σ over the chosen.
    let chosen = biased_sigmoid_choice(v, logits, v.attr_int(id, "k").unwrap_or(1))?;
    if let Some(c) = &chosen {
        at = c.scores;
    }
    let (mm, op) = loop {
        let (p, op) = v.producer(at).ok_or("router logits are a graph input")?;
        match op {
            "Cast" | "Identity" | "Reshape" | "Squeeze" | "Unsqueeze" | "Flatten" => {}
            "Add" if bias_t.is_none() => {
                let (a, b) = (v.input(p, 0), v.input(p, 1));
                let (data, c) = if is_const(v.g, b) { (a, b) } else { (b, a) };
                if !is_const(v.g, c) {
                    return Err("router logits come from an Add of two computed values".into());
                }
                bias_t = Some(c.to_string());
                nodes.push(p);
                at = data;
                continue;
            }
            "MatMul" | "Gemm" => break (p, op),
            _ => return Err(format!("router logits come from {op}, not a MatMul")),
        }
        nodes.push(p);
        at = v.input(p, 0);
    };
    let wr = v.input(mm, 1);
    let rd = const_dims(v.g, wr)
        .filter(|d| d.len() == 2 && is_const(v.g, wr))
        .ok_or("router weight is not a constant matrix")?;
    let trans_b = op == "Gemm" && v.attr_int(mm, "transB") == Some(1);
    let (n, h) = if trans_b {
        (rd[0] as usize, rd[1] as usize)
    } else {
        (rd[1] as usize, rd[0] as usize)
    };
    if op == "Gemm" && !v.input(mm, 2).is_empty() {
        if bias_t.is_some() {
            return Err("router has two biases".into());
        }
        bias_t = Some(v.input(mm, 2).to_string());
    }
    let router_bias = match bias_t {
        Some(t) => {
            let len = const_dims(v.g, &t)
                .map(|d| d.iter().product::<i64>())
                .unwrap_or(-1);
            if len != n as i64 {
                return Err(format!(
                    "router bias '{t}' has {len} elements, not one per expert ({n})"
                ));
            }
            Some(BiasRef {
                tensor: t,
                expert: None,
                rows: None,
                len: n,
            })
        }
        None => None,
    };
    let k = v.attr_int(id, "k").unwrap_or(1) as usize;
    let act_name = v
        .attr_str(id, "activation_type")
        .unwrap_or_else(|| "relu".into());
    let fusion = v.attr_int(id, "swiglu_fusion").unwrap_or(0);
    let alpha = v.attr_float(id, "activation_alpha").unwrap_or(1.0);
    let beta = v.attr_float(id, "activation_beta").unwrap_or(0.0);
    if v.attr_int(id, "use_sparse_mixer") == Some(1) {
        return Err("sparse mixer routing is not supported".into());
    }
    let quantized = v.node(id).op_type.as_deref() == Some("QMoE");
    let slots = if quantized {
        qmoe_slots(v, id)?
    } else {
        Slots {
            w: [2, 4, 6],
            scales: None,
            bias: [3, 5, 7],
        }
    };
    let fc = |i: usize| -> Result<Option<(String, Vec<i64>)>, String> {
        let t = v.input(id, i);
        if t.is_empty() {
            return Ok(None);
        }
        let d = const_dims(v.g, t)
            .filter(|_| is_const(v.g, t))
            .ok_or(format!("input {i} ('{t}') is not a constant"))?;
        Ok(Some((t.to_string(), d)))
    };
    // Quantised codes pack `pack` inputs per byte: the logical dims multiply the last by it.
    let logical = |d: Vec<i64>, f: usize| -> Vec<i64> {
        match &slots.scales {
            Some((_, q)) if d.len() == 3 => vec![d[0], d[1], d[2] * q[f].pack() as i64],
            _ => d,
        }
    };
    let (fc1, d1) = fc(slots.w[0])?.ok_or("no fc1 weights")?;
    let (fc2, d2) = fc(slots.w[1])?.ok_or("no fc2 weights")?;
    let fc3 = fc(slots.w[2])?;
    let (d1, d2) = (logical(d1, 0), logical(d2, 1));
    if d1.len() != 3 || d2.len() != 3 || d1[0] as usize != n || d2[0] as usize != n {
        return Err(format!("fc1 {d1:?} / fc2 {d2:?} are not [N={n}, ·, ·]"));
    }
    let layout = if d1[2] as usize == h && d2[1] as usize == h {
        if d1[1] as usize == h && !quantized {
            notes.push(
                "weight layout ambiguous (square); assuming [N, out, in] (onnxruntime >= 1.23)"
                    .into(),
            );
        }
        Layout::OutIn
    } else if d1[1] as usize == h && d2[2] as usize == h && !quantized {
        notes.push("legacy [N, in, out] weight layout (onnxruntime 1.18-1.22); onnxruntime >= 1.23 CPU silently misreads it".into());
        Layout::InOut
    } else if quantized {
        // CUTLASS-prepacked CUDA weights are stored [N, in, out/pack]: their shapes never fit
        // both fc1 and fc2 of the raw layout.
        return Err(format!(
            "QMoE weights fc1 {d1:?} / fc2 {d2:?} are not the raw [N, out, in/pack] layout for \
             hidden size {h}; onnxruntime-genai's CUDA builds store them CUTLASS-prepacked, \
             which cannot be read: build the model for the CPU provider (-e cpu)"
        ));
    } else {
        return Err(format!("fc1 {d1:?} does not match hidden size {h}"));
    };
    let transpose = layout == Layout::InOut;
    let fc1_out = if transpose { d1[2] } else { d1[1] } as usize;
    let gated = act_name == "swiglu";
    let inter = if gated && fusion != 0 {
        fc1_out / 2
    } else {
        fc1_out
    };
    let (gate_sel, up_sel) = match fusion {
        1 => (RowSel { start: 0, step: 2 }, RowSel { start: 1, step: 2 }),
        2 => (
            RowSel { start: 0, step: 1 },
            RowSel {
                start: inter,
                step: 1,
            },
        ),
        _ => (RowSel { start: 0, step: 1 }, RowSel { start: 0, step: 1 }),
    };
    let limit = v.attr_float(id, "swiglu_limit");
    let act = match act_name.as_str() {
        "relu" => Act::Relu,
        // onnxruntime's CPU kernel uses the tanh approximation.
        "gelu" => Act::GeluTanh,
        "swiglu" if alpha != 1.0 || beta != 0.0 || limit.is_some() => {
            Act::SwigluClamped { alpha, beta, limit }
        }
        "silu" | "swiglu" => Act::Silu,
        "identity" => Act::Identity,
        other => return Err(format!("activation_type '{other}' is not supported")),
    };
    let wref = |f: usize, e: usize, rows: Option<RowSel>, out: usize, inp: usize| WeightRef {
        tensor: [&fc1, &fc2, fc3.as_ref().map_or(&fc1, |x| &x.0)][f].to_string(),
        expert: Some(e),
        transpose,
        rows,
        shape: [out, inp],
        quant: slots.scales.as_ref().map(|(_, q)| q[f].clone()),
    };
    let bias = |f: usize, e: usize, rows: Option<RowSel>, len: usize| -> Option<BiasRef> {
        let t = v.input(id, slots.bias[f]);
        (!t.is_empty()).then(|| BiasRef {
            tensor: t.to_string(),
            expert: Some(e),
            rows,
            len,
        })
    };
    let mut experts = Vec::new();
    for e in 0..n {
        let (gate, up, gate_bias, up_bias) = if gated && fusion == 0 {
            if fc3.is_none() {
                return Err("swiglu without fusion needs fc3".into());
            }
            (
                Some(wref(0, e, None, inter, h)),
                wref(2, e, None, inter, h),
                bias(0, e, None, inter),
                bias(2, e, None, inter),
            )
        } else if gated {
            (
                Some(wref(0, e, Some(gate_sel), inter, h)),
                wref(0, e, Some(up_sel), inter, h),
                bias(0, e, Some(gate_sel), inter),
                bias(0, e, Some(up_sel), inter),
            )
        } else {
            (
                None,
                wref(0, e, None, inter, h),
                None,
                bias(0, e, None, inter),
            )
        };
        experts.push(Expert {
            index: e,
            ffn: Ffn {
                gate,
                up,
                down: wref(1, e, None, h, inter),
                gate_bias,
                up_bias,
                down_bias: bias(1, e, None, h),
                act,
            },
        });
    }
    let name = v.node(id).name.clone().unwrap_or_default();
    Ok((
        MoeBlock {
            name,
            form: Form::OrtFused,
            input: x.to_string(),
            output: v.output(id, 0).to_string(),
            router: Router {
                weight: WeightRef {
                    tensor: wr.to_string(),
                    expert: None,
                    transpose: !trans_b,
                    rows: None,
                    shape: [n, h],
                    quant: None,
                },
                bias: router_bias,
                num_experts: n,
                top_k: k,
                scoring: if chosen.is_some() {
                    Scoring::Sigmoid
                } else {
                    Scoring::Softmax
                },
                // With a biased choice the op's softmax over the k finite entries already
                // sums to 1, whatever `normalize_routing_weights` says.
                renormalize: chosen.is_some()
                    || v.attr_int(id, "normalize_routing_weights") == Some(1),
                capacity: None,
                selection_bias: chosen.as_ref().map(|c| BiasRef {
                    tensor: c.bias.clone(),
                    expert: None,
                    rows: None,
                    len: n,
                }),
                groups: None,
                scale: 1.0,
                jitter_eps: None,
                logits: chosen
                    .as_ref()
                    .map_or(logits.to_string(), |c| c.scores.to_string()),
            },
            experts,
            shared: vec![],
            nodes: match &chosen {
                // The sigmoid, the choice and the router MatMul also feed LFM2's output
                // scale outside the op: only the scatter is the block's own.
                Some(c) => {
                    let mut all = c.nodes.clone();
                    all.push(id);
                    all
                }
                None => {
                    let mut all = vec![mm];
                    all.extend(nodes.into_iter().rev());
                    all.push(id);
                    all
                }
            },
            expert_bytes: 0,
        },
        layout,
        notes,
    ))
}

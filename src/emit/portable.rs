//! The portable canonical form of an MoE block, in standard ONNX ops (opset ≥ 13).
//!
//! ```text
//! x2 = Reshape(X, [-1, H]);  logits = x2·Wrᵀ (+b);  p = Softmax|Sigmoid(logits)
//! vals, idx = TopK(p, k)  (renormalised if the block renormalises; Switch capacity mask)
//! gid = Gather(lut, idx)            (only when experts were merged: N → M lookup)
//! for each expert (or merged group) m:
//!     w_m  = ReduceSum(vals · [gid == m], -1)          [T]   (two chosen in one group add)
//!     rows = NonZero(ReduceSum([gid == m], -1))          tokens routed to m
//!     c_m  = FFN_m(x2[rows]) · w_m[rows]
//!     acc[rows] = acc[rows] + c_m      (Gather, Add, ScatterND without reduction: each
//!                                       target's rows are distinct, so no duplicate index)
//! acc += σ(x2·g)·FFN_shared(x2)     (shared experts)
//! Y = Reshape(acc, Shape(X))
//! ```
//! Sparse (each expert sees only its tokens), valid at every batch and sequence length.
//! No scatter reduction is used: onnxruntime's CPU ScatterND(reduction=add) is racy with
//! duplicate indices (onnxruntime#18048) and tract < 0.23 ignores `reduction`.
use super::builder::Emitter;
use crate::error::{Error, Result};
use crate::ir::builder::{attr_int, attr_ints};
use crate::moe::proj::{Proj, ProjFfn};
use crate::moe::weights::{matrix, vector};
use crate::moe::{Act, Ffn, MoeBlock, Scoring, WeightRef};
use crate::onnx::proto::tensor_proto::DataType;
use ndarray::{Array1, Array2};

/// Where an emitted expert's weights come from.
pub enum TargetFfn<'a> {
    /// An expert of the model, as detected (its tensors are read from the graph).
    Described(&'a Ffn),
    /// New weights (merged and/or compressed), written as new initializers; shared bases
    /// (indexed by [`Proj::BaseDelta`]) are written once per block.
    Proj(&'a ProjFfn, &'a [Array2<f32>]),
}

/// One expert (or merged group) to emit: its FFN, and the router expert ids it answers.
pub struct Target<'a> {
    /// The network.
    pub ffn: TargetFfn<'a>,
    /// Router expert indices routed to it (indices into the kept router rows).
    pub ids: Vec<usize>,
}

/// Emits `block` computing `targets` into `em`; the last node writes `block.output`.
/// `router_rows`: the router rows kept (pruning; `None` keeps all N, and `ids` index them).
/// Returns the name of the router-logits value.
pub fn emit(
    em: &mut Emitter,
    block: &MoeBlock,
    targets: &[Target],
    router_rows: Option<&[usize]>,
) -> Result<String> {
    let fail = |reason: String| Error::Graph {
        node: Some(block.name.clone()),
        reason,
    };
    if em.opset < 13 {
        return Err(fail(format!(
            "re-emission needs opset >= 13, the model has {}",
            em.opset
        )));
    }
    em.float = block_float(em.graph(), block)?;
    let r = &block.router;
    let h = block.hidden() as i64;
    let n = router_rows.map_or(r.num_experts, <[usize]>::len);
    if r.top_k > n {
        return Err(fail(format!(
            "top-{} routing needs at least {} experts, {n} kept",
            r.top_k, r.top_k
        )));
    }
    let x2 = em.reshape(&block.input, &[-1, h]);
    let logits = router_logits(em, block, &x2, router_rows)?;
    let logits_out = logits.clone();
    let k = em.ints("k", &[1], &[r.top_k as i64]);
    let (vals, idx) = match r.scoring {
        Scoring::Softmax | Scoring::Sigmoid => {
            let op = if r.scoring == Scoring::Softmax {
                "Softmax"
            } else {
                "Sigmoid"
            };
            let attrs = if op == "Softmax" {
                vec![attr_int("axis", -1)]
            } else {
                vec![]
            };
            let p = em.op(op, &[&logits], attrs);
            if r.selection_bias.is_none() && r.groups.is_none() {
                let o = em.op_multi("TopK", &[&p, &k], 2, topk_attrs());
                (o[0].clone(), o[1].clone())
            } else {
                let choice = choice_scores(em, block, &p, router_rows)?;
                let o = em.op_multi("TopK", &[&choice, &k], 2, topk_attrs());
                let idx = o[1].clone();
                let vals = em.op("GatherElements", &[&p, &idx], vec![attr_int("axis", 1)]);
                (vals, idx)
            }
        }
        Scoring::SoftmaxAfterTopk => {
            let o = em.op_multi("TopK", &[&logits, &k], 2, topk_attrs());
            let s = em.op("Softmax", &[&o[0]], vec![attr_int("axis", -1)]);
            (s, o[1].clone())
        }
        Scoring::Sparsemixer => sparsemixer(em, &logits, r.jitter_eps.unwrap_or(0.0)),
    };
    let mut vals = if r.renormalize && r.scoring != Scoring::SoftmaxAfterTopk {
        let s = em.reduce_sum(&vals, &[-1], true);
        em.op("Div", &[&vals, &s], vec![])
    } else {
        vals
    };
    if r.scale != 1.0 {
        let c = em.floats("routed_scaling", &[], &[r.scale]);
        vals = em.op("Mul", &[&vals, &c], vec![]);
    }
    if let Some(cap) = r.capacity {
        if r.top_k != 1 {
            return Err(fail(
                "expert capacity is supported for top-1 routers only".into(),
            ));
        }
        // One-hot [T, k, N] of the chosen experts ([T, k, 1] == [N]).
        let idx3 = em.unsqueeze(&idx, &[-1]);
        let range: Vec<i64> = (0..n as i64).collect();
        let ar = em.ints("experts", &[n as i64], &range);
        let onehot_b = em.op("Equal", &[&idx3, &ar], vec![]);
        let onehot = em.op(
            "Cast",
            &[&onehot_b],
            vec![attr_int("to", i64::from(em.float))],
        );
        // Per sequence, in token order: keep a token while its expert has taken <= cap tokens.
        let shape_x = em.op("Shape", &[&block.input], vec![]);
        let zero = em.ints("zero", &[1], &[0]);
        let two = em.ints("two", &[1], &[2]);
        let bs = em.op("Slice", &[&shape_x, &zero, &two], vec![]);
        let nn = em.ints("n", &[1], &[n as i64]);
        let bsn = em.op("Concat", &[&bs, &nn], vec![attr_int("axis", 0)]);
        let oh3 = em.op("Reshape", &[&onehot, &bsn], vec![]);
        let ax = em.ints("axis", &[], &[1]);
        let cum = em.op("CumSum", &[&oh3, &ax], vec![]);
        let capc = em.floats("capacity", &[], &[cap as f32]);
        let ok_b = em.op("LessOrEqual", &[&cum, &capc], vec![]);
        let ok = em.op("Cast", &[&ok_b], vec![attr_int("to", i64::from(em.float))]);
        let kept = em.op("Mul", &[&oh3, &ok], vec![]);
        let kept_sum = em.reduce_sum(&kept, &[-1], false);
        let keep = em.reshape(&kept_sum, &[-1, 1]);
        vals = em.op("Mul", &[&vals, &keep], vec![]);
    }
    let mut acc = em.filled_like(&x2, 0.0);
    // Router id -> target index (-1: no target); skipped when it is the identity.
    let identity = targets.len() == n && targets.iter().enumerate().all(|(i, t)| t.ids == [i]);
    let gid = if identity {
        idx.clone()
    } else {
        let mut lut = vec![-1i64; n];
        for (i, t) in targets.iter().enumerate() {
            for &e in &t.ids {
                lut[e] = i as i64;
            }
        }
        let l = em.ints("lut", &[n as i64], &lut);
        em.op("Gather", &[&l, &idx], vec![attr_int("axis", 0)])
    };
    // Contributions are accumulated target by target: acc[rows] = acc[rows] + c (Gather, Add,
    // ScatterND without reduction). Each target's rows are distinct, so no ScatterND ever sees
    // a duplicate index: onnxruntime's CPU ScatterND with reduction=add races on duplicates
    // under multi-threading (onnxruntime#18048), which one concatenated scatter would hit.
    for (i, t) in targets.iter().enumerate() {
        let ti = em.ints(&format!("target{i}"), &[], &[i as i64]);
        let eq = em.op("Equal", &[&gid, &ti], vec![]);
        let m = em.op("Cast", &[&eq], vec![attr_int("to", i64::from(em.float))]); // [T, k]
        let wm = em.op("Mul", &[&vals, &m], vec![]);
        let w = em.reduce_sum(&wm, &[-1], false); // [T]
        let hits = em.reduce_sum(&m, &[-1], false);
        let hit = em.op(
            "Cast",
            &[&hits],
            vec![attr_int("to", DataType::Bool as i64)],
        );
        let nz = em.op("NonZero", &[&hit], vec![]); // [1, n]
        let rows = em.reshape(&nz, &[-1]);
        let xs = em.op("Gather", &[&x2, &rows], vec![attr_int("axis", 0)]);
        let out = match t.ffn {
            TargetFfn::Described(f) => ffn(em, f, &xs)?,
            TargetFfn::Proj(p, bases) => proj_ffn(em, p, bases, &xs),
        };
        let ws = em.op("Gather", &[&w, &rows], vec![attr_int("axis", 0)]);
        let ws2 = em.unsqueeze(&ws, &[-1]);
        let contrib = em.op("Mul", &[&out, &ws2], vec![]);
        let idx2 = em.op("Transpose", &[&nz], vec![attr_ints("perm", &[1, 0])]);
        let old = em.op("Gather", &[&acc, &rows], vec![attr_int("axis", 0)]);
        let sum = em.op("Add", &[&old, &contrib], vec![]);
        acc = em.op("ScatterND", &[&acc, &idx2, &sum], vec![]);
    }
    for s in &block.shared {
        let out = shared_expert(em, s, &x2)?;
        acc = em.op("Add", &[&acc, &out], vec![]);
    }
    let shape_x = em.op("Shape", &[&block.input], vec![]);
    em.op_into("Reshape", &[&acc, &shape_x], &block.output, vec![]);
    Ok(logits_out)
}

/// The scores the experts are chosen by, when they are not the weights (DeepSeek-V3): the
/// scores plus the selection bias, with the experts outside the best groups set to -inf.
pub(crate) fn choice_scores(
    em: &mut Emitter,
    block: &MoeBlock,
    scores: &str,
    rows: Option<&[usize]>,
) -> Result<String> {
    let r = &block.router;
    let mut choice = scores.to_string();
    if let Some(b) = &r.selection_bias {
        choice = add_expert_vector(em, &choice, b, rows, "selection_bias")?;
    }
    let Some(g) = r.groups else {
        return Ok(choice);
    };
    if rows.is_some() {
        return Err(Error::Graph {
            node: Some(block.name.clone()),
            reason: "experts of a group-limited router cannot be removed (the groups would no \
                     longer be equal); merge them instead (a merge keeps every router row)"
                .into(),
        });
    }
    let (count, per) = (g.count as i64, (r.num_experts / g.count) as i64);
    // Group score: the sum of the group's two best choice scores.
    let c3 = em.reshape(&choice, &[-1, count, per]);
    let k2 = em.ints("k_in_group", &[1], &[per.min(2)]);
    let best = em.op_multi("TopK", &[&c3, &k2], 2, topk_attrs());
    let gs = em.reduce_sum(&best[0], &[-1], false);
    let kg = em.ints("k_groups", &[1], &[g.top as i64]);
    let top = em.op_multi("TopK", &[&gs, &kg], 2, topk_attrs());
    // Mask [T, G]: 1 at the kept groups, spread over their experts.
    let zeros = em.filled_like(&gs, 0.0);
    let ones = em.filled_like(&top[1], 1.0);
    let mask = em.op(
        "ScatterElements",
        &[&zeros, &top[1], &ones],
        vec![attr_int("axis", 1)],
    );
    let m3 = em.unsqueeze(&mask, &[-1]);
    let shape3 = em.op("Shape", &[&c3], vec![]);
    let spread = em.op("Expand", &[&m3, &shape3], vec![]);
    let flat = em.reshape(&spread, &[-1, r.num_experts as i64]);
    let keep = em.op(
        "Cast",
        &[&flat],
        vec![attr_int("to", DataType::Bool as i64)],
    );
    let ninf = em.floats("masked", &[], &[f32::NEG_INFINITY]);
    Ok(em.op("Where", &[&keep, &choice, &ninf], vec![]))
}

/// PhiMoE's sparsemixer (top-2) on logits `z`: the weights `[T, 2]` and expert ids `[T, 2]`
/// (see [`Scoring::Sparsemixer`]).
fn sparsemixer(em: &mut Emitter, z: &str, eps: f32) -> (String, String) {
    let one = em.ints("k1", &[1], &[1]);
    let abs = em.op("Abs", &[z], vec![]);
    let two_eps = em.floats("two_eps", &[], &[2.0 * eps]);
    let ninf = em.floats("ninf", &[], &[f32::NEG_INFINITY]);
    // One pick: the best of `from`, weighted by the softmax over `from` within 2·eps of it.
    let pick = |em: &mut Emitter, from: &str| {
        let t = em.op_multi("TopK", &[from, &one], 2, topk_attrs());
        let fac = em.op("Max", &[&abs, &t[0]], vec![]);
        let gap = em.op("Sub", &[&t[0], z], vec![]);
        let rel = em.op("Div", &[&gap, &fac], vec![]);
        let out = em.op("Greater", &[&rel, &two_eps], vec![]);
        let g = em.op("Where", &[&out, &ninf, from], vec![]);
        let p = em.op("Softmax", &[&g], vec![attr_int("axis", -1)]);
        let w = em.op("GatherElements", &[&p, &t[1]], vec![attr_int("axis", 1)]);
        (w, t[1].clone())
    };
    let (w1, i1) = pick(em, z);
    let fill = em.filled_like(&i1, f32::NEG_INFINITY);
    let others = em.op(
        "ScatterElements",
        &[z, &i1, &fill],
        vec![attr_int("axis", 1)],
    );
    let (w2, i2) = pick(em, &others);
    let vals = em.op("Concat", &[&w1, &w2], vec![attr_int("axis", 1)]);
    let idx = em.op("Concat", &[&i1, &i2], vec![attr_int("axis", 1)]);
    (vals, idx)
}

/// Router logits `x2·Wᵀ (+ b)` over all router rows, or over the kept `rows` (pruning).
pub fn router_logits(
    em: &mut Emitter,
    block: &MoeBlock,
    x2: &str,
    rows: Option<&[usize]>,
) -> Result<String> {
    let r = &block.router;
    let h = block.hidden();
    let wr = match rows {
        None => router_weight(em, block)?,
        Some(rows) => {
            let m = matrix(em.graph(), &r.weight)?;
            let mut t = vec![0f32; rows.len() * h];
            for (c, &e) in rows.iter().enumerate() {
                for j in 0..h {
                    t[j * rows.len() + c] = m[e * h + j];
                }
            }
            em.floats("router_w", &[h as i64, rows.len() as i64], &t)
        }
    };
    let mut logits = em.op("MatMul", &[x2, &wr], vec![]);
    if let Some(b) = &r.bias {
        logits = add_expert_vector(em, &logits, b, rows, "router_bias")?;
    }
    Ok(logits)
}

/// `x + b` for a per-expert vector `b` over the router's N, or over the kept `rows`.
fn add_expert_vector(
    em: &mut Emitter,
    x: &str,
    b: &crate::moe::block::BiasRef,
    rows: Option<&[usize]>,
    hint: &str,
) -> Result<String> {
    let mut bv = vector(em.graph(), b)?;
    if let Some(rows) = rows {
        bv = rows.iter().map(|&e| bv[e]).collect();
    }
    let bn = em.floats(hint, &[bv.len() as i64], &bv);
    Ok(em.op("Add", &[x, &bn], vec![]))
}

/// The element type a block computes in: its router weight's (float, float16 or bfloat16);
/// the emitted subgraph keeps it, so a half-precision model stays half precision.
pub fn block_float(g: &crate::ir::Graph, block: &MoeBlock) -> Result<i32> {
    let dt = block.weight_dtype(g);
    let ok = [DataType::Float, DataType::Float16, DataType::Bfloat16];
    if !ok.iter().any(|d| *d as i32 == dt) {
        let name =
            DataType::try_from(dt).map_or(format!("type {dt}"), |d| d.as_str_name().to_lowercase());
        return Err(Error::Graph {
            node: Some(block.name.clone()),
            reason: format!(
                "smoe-opt rewrites float32, float16 and bfloat16 MoE blocks; this block's router \
                 weight is {name}"
            ),
        });
    }
    Ok(dt)
}

/// The router weight as `[H, N]` for `MatMul(x, W)`.
pub fn router_weight(em: &mut Emitter, block: &MoeBlock) -> Result<String> {
    linear_weight(em, &block.router.weight)
}

/// A shared expert on `x2` ([T, H]), scaled by its sigmoid gate when it has one.
pub fn shared_expert(em: &mut Emitter, s: &crate::moe::SharedExpert, x2: &str) -> Result<String> {
    let mut out = ffn(em, &s.ffn, x2)?;
    if let Some(g) = &s.gate {
        let gw = linear_weight(em, g)?;
        let gl = em.op("MatMul", &[x2, &gw], vec![]);
        let gs = em.op("Sigmoid", &[&gl], vec![]);
        out = em.op("Mul", &[&out, &gs], vec![]);
    }
    Ok(out)
}

pub(crate) fn topk_attrs() -> Vec<crate::onnx::proto::AttributeProto> {
    vec![
        attr_int("axis", -1),
        attr_int("largest", 1),
        attr_int("sorted", 1),
    ]
}

/// The `[in, out]` weight for `MatMul(x, W)`: the original initializer when it is stored
/// that way already, else a new one.
fn linear_weight(em: &mut Emitter, w: &WeightRef) -> Result<String> {
    let g = em.graph();
    if w.transpose && w.rows.is_none() && w.expert.is_none() && g.initializer(&w.tensor).is_some() {
        return Ok(w.tensor.clone());
    }
    let m = matrix(g, w)?;
    let [out, inp] = w.shape;
    let mut t = vec![0f32; out * inp];
    for i in 0..out {
        for j in 0..inp {
            t[j * out + i] = m[i * inp + j];
        }
    }
    Ok(em.floats("w", &[inp as i64, out as i64], &t))
}

fn linear(
    em: &mut Emitter,
    x: &str,
    w: &WeightRef,
    b: Option<&crate::moe::block::BiasRef>,
) -> Result<String> {
    let wn = linear_weight(em, w)?;
    let y = em.op("MatMul", &[x, &wn], vec![]);
    Ok(match b {
        Some(b) => {
            let v = vector(em.graph(), b)?;
            let bn = em.floats("b", &[v.len() as i64], &v);
            em.op("Add", &[&y, &bn], vec![])
        }
        None => y,
    })
}

fn act(em: &mut Emitter, x: &str, a: Act) -> String {
    match a {
        Act::Relu => em.op("Relu", &[x], vec![]),
        Act::Identity => x.to_string(),
        Act::Silu => {
            let s = em.op("Sigmoid", &[x], vec![]);
            em.op("Mul", &[x, &s], vec![])
        }
        Act::SwigluClamped { alpha, limit, .. } => {
            // g' = min(g, limit); g'·σ(alpha·g')
            let g = match limit {
                Some(l) => {
                    let lc = em.floats("limit", &[], &[l]);
                    em.op("Min", &[x, &lc], vec![])
                }
                None => x.to_string(),
            };
            let ac = em.floats("alpha", &[], &[alpha]);
            let ga = em.op("Mul", &[&g, &ac], vec![]);
            let s = em.op("Sigmoid", &[&ga], vec![]);
            em.op("Mul", &[&g, &s], vec![])
        }
        Act::Gelu => {
            // 0.5·x·(1 + erf(x/√2))
            let c = em.floats("inv_sqrt2", &[], &[std::f32::consts::FRAC_1_SQRT_2]);
            let xs = em.op("Mul", &[x, &c], vec![]);
            let e = em.op("Erf", &[&xs], vec![]);
            let one = em.floats("one", &[], &[1.0]);
            let e1 = em.op("Add", &[&e, &one], vec![]);
            let half = em.floats("half", &[], &[0.5]);
            let xh = em.op("Mul", &[x, &half], vec![]);
            em.op("Mul", &[&xh, &e1], vec![])
        }
        Act::GeluTanh => {
            // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
            let x3 = em.op("Mul", &[x, x], vec![]);
            let x3 = em.op("Mul", &[&x3, x], vec![]);
            let c = em.floats("c", &[], &[0.044715]);
            let t = em.op("Mul", &[&x3, &c], vec![]);
            let inner = em.op("Add", &[x, &t], vec![]);
            let s = em.floats("s", &[], &[(2.0f32 / std::f32::consts::PI).sqrt()]);
            let inner = em.op("Mul", &[&inner, &s], vec![]);
            let th = em.op("Tanh", &[&inner], vec![]);
            let one = em.floats("one", &[], &[1.0]);
            let th1 = em.op("Add", &[&th, &one], vec![]);
            let half = em.floats("half", &[], &[0.5]);
            let xh = em.op("Mul", &[x, &half], vec![]);
            em.op("Mul", &[&xh, &th1], vec![])
        }
    }
}

/// Emits an FFN on `x` ([rows, H]) and returns its output ([rows, H]).
pub fn ffn(em: &mut Emitter, f: &Ffn, x: &str) -> Result<String> {
    let up = linear(em, x, &f.up, f.up_bias.as_ref())?;
    let gate = match &f.gate {
        Some(g) => Some(linear(em, x, g, f.gate_bias.as_ref())?),
        None => None,
    };
    let h = hidden(em, &up, gate.as_deref(), f.act);
    linear(em, &h, &f.down, f.down_bias.as_ref())
}

/// The intermediate activation: `act(gate) · up` for gated FFNs (gpt-oss: clamped, with
/// `beta` added to up), else `act(up)`.
fn hidden(em: &mut Emitter, up: &str, gate: Option<&str>, a: Act) -> String {
    match gate {
        Some(g) => {
            let ga = act(em, g, a);
            let up = match a {
                Act::SwigluClamped { beta, limit, .. } => {
                    // clamp(u, -limit, limit) + beta
                    let u = match limit {
                        Some(l) => {
                            let hi = em.floats("limit", &[], &[l]);
                            let lo = em.floats("neg_limit", &[], &[-l]);
                            let u = em.op("Min", &[up, &hi], vec![]);
                            em.op("Max", &[&u, &lo], vec![])
                        }
                        None => up.to_string(),
                    };
                    let b = em.floats("beta", &[], &[beta]);
                    em.op("Add", &[&u, &b], vec![])
                }
                _ => up.to_string(),
            };
            em.op("Mul", &[&ga, &up], vec![])
        }
        None => act(em, up, a),
    }
}

/// A canonical `[out, in]` matrix as a new `[in, out]` initializer for `MatMul(x, W)`.
fn matmul_weight(em: &mut Emitter, hint: &str, w: ndarray::ArrayView2<f32>) -> String {
    let (out, inp) = w.dim();
    let t: Vec<f32> = w.t().iter().copied().collect();
    em.floats(hint, &[inp as i64, out as i64], &t)
}

/// `x·Ŵᵀ (+ b)` for a stored projection: one MatMul (dense), two (low rank: `(x·vᵀ)·uᵀ`), or
/// the shared base's MatMul plus the low-rank delta's.
fn proj_linear(
    em: &mut Emitter,
    x: &str,
    p: &Proj,
    bases: &[Array2<f32>],
    b: Option<&Array1<f32>>,
) -> String {
    let low_rank = |em: &mut Emitter, u: &Array2<f32>, v: &Array2<f32>| {
        let vn = matmul_weight(em, "lr_v", v.view());
        let un = matmul_weight(em, "lr_u", u.view());
        let t = em.op("MatMul", &[x, &vn], vec![]);
        em.op("MatMul", &[&t, &un], vec![])
    };
    let y = match p {
        Proj::Dense(w) => {
            let wn = matmul_weight(em, "w", w.view());
            em.op("MatMul", &[x, &wn], vec![])
        }
        Proj::LowRank { u, v } => low_rank(em, u, v),
        Proj::BaseDelta { base, u, v } => {
            let bn = match em.bases.get(base) {
                Some(n) => n.clone(),
                None => {
                    let n = matmul_weight(em, "base", bases[*base].view());
                    em.bases.insert(*base, n.clone());
                    n
                }
            };
            let yb = em.op("MatMul", &[x, &bn], vec![]);
            if u.ncols() == 0 {
                yb
            } else {
                let yd = low_rank(em, u, v);
                em.op("Add", &[&yb, &yd], vec![])
            }
        }
    };
    match b {
        Some(b) => {
            let bn = em.floats("b", &[b.len() as i64], &b.to_vec());
            em.op("Add", &[&y, &bn], vec![])
        }
        None => y,
    }
}

/// Emits an FFN with new (merged and/or compressed) weights on `x` ([rows, H]).
pub fn proj_ffn(em: &mut Emitter, p: &ProjFfn, bases: &[Array2<f32>], x: &str) -> String {
    let up = proj_linear(em, x, &p.up, bases, p.up_bias.as_ref());
    let gate = p
        .gate
        .as_ref()
        .map(|g| proj_linear(em, x, g, bases, p.gate_bias.as_ref()));
    let h = hidden(em, &up, gate.as_deref(), p.act);
    proj_linear(em, &h, &p.down, bases, p.down_bias.as_ref())
}

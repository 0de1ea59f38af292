//! Expert recognition inside a closed block region: which MatMuls belong to which expert
//! (found from the expert-mask row each one's tokens are selected by), their roles
//! (gate/up/down, fused gate|up halves), activation and biases; batched 3-D forms; shared
//! experts.
use super::block::{Act, BiasRef, Expert, Ffn, Form, RowSel, SharedExpert, WeightRef};
use super::consts::{self, const_dims, const_scalar_int, is_const};
use super::region::PASSTHROUGH;
use super::router::FoundRouter;
use super::view::View;
use crate::ir::NodeId;
use std::collections::{BTreeMap, HashSet};

/// Experts found in a region.
pub struct Extracted {
    /// The form.
    pub form: Form,
    /// Routed experts, by index.
    pub experts: Vec<Expert>,
    /// Shared experts.
    pub shared: Vec<SharedExpert>,
    /// Expert identity came from a `Split` baked at export time (valid only when every
    /// expert is hit), not from constants.
    pub specialised: bool,
}

/// A MatMul/Gemm with a weight.
#[derive(Clone)]
struct Linear {
    node: NodeId,
    data: String,
    out: String,
    w: WeightRef,
    bias: Option<BiasRef>,
}

impl Linear {
    /// Node `id` reading `data` through weight `w` (no bias yet).
    fn new(v: &View, id: NodeId, data: &str, w: WeightRef) -> Self {
        Linear {
            node: id,
            data: data.to_string(),
            out: v.output(id, 0).to_string(),
            w,
            bias: None,
        }
    }
}

/// Extracts the experts of the region `region` routed by `r`, with block input `x`.
pub fn extract(v: &View, region: &[NodeId], r: &FoundRouter, x: &str) -> Result<Extracted, String> {
    let within: HashSet<NodeId> = region.iter().copied().collect();
    let sel_cone = v.forward_cone(&[r.indices.as_str()], Some(&within));
    let mut sel_values: HashSet<&str> = sel_cone
        .iter()
        .flat_map(|&id| v.node(id).output.iter().map(String::as_str))
        .collect();
    sel_values.insert(r.indices.as_str());
    let n = r.router.num_experts;

    let mut plain = Vec::new();
    let mut batched = Vec::new();
    let mut by_expert: BTreeMap<usize, Vec<Linear>> = BTreeMap::new();
    let mut specialised = false;
    for &id in region {
        if id == r.matmul || !matches!(v.op(id), "MatMul" | "Gemm") {
            continue;
        }
        if let Some(l) = linear_2d(v, id) {
            plain.push(l);
        } else if let Some((l, e, spec)) = linear_sliced(v, id, &sel_values) {
            // The weight itself names the expert.
            by_expert.entry(e).or_default().push(l);
            specialised |= spec;
        } else if let Some(l) = linear_3d(v, id, &sel_values, n)? {
            batched.push(l);
        }
    }
    let stop: HashSet<&str> = [x].into_iter().collect();
    let mut shared_uses = Vec::new();
    let mut dense = false;
    for l in plain {
        let anc = v.ancestors(&l.data, &within, &stop);
        let routed = anc.iter().any(|a| sel_cone.contains(a));
        let mut ids = HashSet::new();
        for &a in &anc {
            if let Some((e, spec)) = expert_index(v, a, &sel_values) {
                ids.insert(e);
                specialised |= spec;
            }
        }
        if ids.is_empty() && !routed {
            // Dense all-experts form: the expert runs on every token and its output is
            // scaled by column e of a [T, N] routing-weight matrix.
            if let Some(e) = dense_column_of(v, &within, &l.out, &sel_values) {
                dense = true;
                by_expert.entry(e).or_default().push(l);
                continue;
            }
        }
        match (ids.len(), routed) {
            (0, false) => shared_uses.push(l),
            (0, true) => {
                if batched.is_empty() {
                    return Err(format!(
                        "MatMul '{}' reads routed tokens but no expert index was found for it",
                        v.node(l.node).name.as_deref().unwrap_or("")
                    ));
                }
                // Part of a batched expert computation (e.g. a reshape matmul); ignore.
            }
            (1, _) => by_expert
                .entry(*ids.iter().next().unwrap())
                .or_default()
                .push(l),
            _ => {
                let mut e: Vec<_> = ids.into_iter().collect();
                e.sort();
                return Err(format!(
                    "MatMul '{}' depends on the masks of several experts {e:?}",
                    v.node(l.node).name.as_deref().unwrap_or("")
                ));
            }
        }
    }
    let shared = shared_experts(v, &within, shared_uses)?;
    if !batched.is_empty() {
        if !by_expert.is_empty() {
            return Err("mixes batched 3-D experts with per-expert chains".into());
        }
        let template = ffn_from(v, &within, &batched)?;
        let experts = (0..n)
            .map(|e| Expert {
                index: e,
                ffn: with_expert(&template, e),
            })
            .collect();
        return Ok(Extracted {
            form: Form::Batched3d,
            experts,
            shared,
            specialised: false,
        });
    }
    if by_expert.is_empty() {
        return Err("no expert weights found between the router and the block output".into());
    }
    let mut experts = Vec::new();
    for (e, uses) in by_expert {
        if e >= n {
            return Err(format!(
                "expert index {e} is outside the router's {n} experts"
            ));
        }
        let ffn = ffn_from(v, &within, &uses).map_err(|m| format!("expert {e}: {m}"))?;
        experts.push(Expert { index: e, ffn });
    }
    let first = &experts[0].ffn;
    for e in &experts {
        if e.ffn.hidden() != first.hidden() || e.ffn.activation_name() != first.activation_name() {
            return Err(format!(
                "expert {} differs in shape or activation from expert {}",
                e.index, experts[0].index
            ));
        }
    }
    Ok(Extracted {
        form: if dense {
            Form::DenseAll
        } else {
            Form::PerExpert
        },
        experts,
        shared,
        specialised,
    })
}

/// MatMul(x, W[in,out]) or Gemm(x, W) with a constant 2-D weight.
fn linear_2d(v: &View, id: NodeId) -> Option<Linear> {
    let (data, w) = (v.input(id, 0), v.input(id, 1));
    if !is_const(v.g, w) || is_const(v.g, data) {
        return None;
    }
    let dims = const_dims(v.g, w)?;
    if dims.len() != 2 {
        return None;
    }
    let gemm = v.op(id) == "Gemm";
    if gemm && v.attr_int(id, "transA") == Some(1) {
        return None;
    }
    let trans_b = gemm && v.attr_int(id, "transB") == Some(1);
    let (out, inp) = if trans_b {
        (dims[0], dims[1])
    } else {
        (dims[1], dims[0])
    };
    let mut l = Linear::new(
        v,
        id,
        data,
        WeightRef {
            tensor: w.to_string(),
            expert: None,
            transpose: !trans_b,
            rows: None,
            shape: [out as usize, inp as usize],
            quant: None,
        },
    );
    if gemm && !v.input(id, 2).is_empty() {
        l.bias = Some(BiasRef {
            tensor: v.input(id, 2).to_string(),
            expert: None,
            rows: None,
            len: out as usize,
        });
    } else {
        attach_bias(v, &mut l);
    }
    Some(l)
}

/// The single consumer of `out` when it is an Add, and the Add's other operand.
fn sole_add<'v>(v: &'v View, out: &str) -> Option<(NodeId, &'v str)> {
    let [add] = v.consumers(out) else {
        return None;
    };
    if v.op(*add) != "Add" {
        return None;
    }
    let other = if v.input(*add, 0) == out {
        v.input(*add, 1)
    } else {
        v.input(*add, 0)
    };
    Some((*add, other))
}

/// A following Add of a constant `[out]` vector is the bias.
fn attach_bias(v: &View, l: &mut Linear) {
    let Some((add, other)) = sole_add(v, &l.out) else {
        return;
    };
    let dims = const_dims(v.g, other).unwrap_or_default();
    if is_const(v.g, other)
        && dims.last().copied() == Some(l.w.shape[0] as i64)
        && dims.iter().product::<i64>() == l.w.shape[0] as i64
    {
        l.bias = Some(BiasRef {
            tensor: other.to_string(),
            expert: None,
            rows: None,
            len: l.w.shape[0],
        });
        l.out = v.output(add, 0).to_string();
    }
}

/// A batched MatMul one of whose operands is Gather/GatherND of a stacked `[N, a, b]`
/// constant by routed expert ids.
fn linear_3d(
    v: &View,
    id: NodeId,
    sel: &HashSet<&str>,
    n: usize,
) -> Result<Option<Linear>, String> {
    for side in 0..2 {
        let operand = v.skip_back(v.input(id, side), &["Cast", "Identity"]);
        let Some((g, op)) = v.producer(operand) else {
            continue;
        };
        if !matches!(op, "Gather" | "GatherND") {
            continue;
        }
        let w = v.input(g, 0);
        let dims = match const_dims(v.g, w) {
            Some(d) if d.len() == 3 && is_const(v.g, w) => d,
            _ => continue,
        };
        if !sel.contains(v.input(g, 1)) {
            continue;
        }
        if dims[0] as usize != n {
            return Err(format!(
                "stacked expert weight '{w}' has {} experts, the router {n}",
                dims[0]
            ));
        }
        let (a, b) = (dims[1] as usize, dims[2] as usize);
        // Weight on the left: W[e] (a×b) · x → out a: canonical [a, b]. On the right: x · W[e] → [b, a].
        let (shape, transpose) = if side == 0 {
            ([a, b], false)
        } else {
            ([b, a], true)
        };
        let mut l = Linear::new(
            v,
            id,
            v.input(id, 1 - side),
            WeightRef {
                tensor: w.to_string(),
                expert: Some(0),
                transpose,
                rows: None,
                shape,
                quant: None,
            },
        );
        attach_batched_bias(v, &mut l, sel, n);
        return Ok(Some(l));
    }
    Ok(None)
}

/// A bias gathered by the routed expert ids: `Add(out, Gather/GatherND(B[N, out], ids))`
/// after reshapes (gpt-oss's expert biases in a dynamo export).
fn attach_batched_bias(v: &View, l: &mut Linear, sel: &HashSet<&str>, n: usize) {
    let mut out = l.out.clone();
    loop {
        let cons = v.consumers(&out);
        let [c] = cons else { return };
        match v.op(*c) {
            op if PASSTHROUGH.contains(&op) => out = v.output(*c, 0).to_string(),
            "Add" => {
                let Some((_, other)) = sole_add(v, &out) else {
                    return;
                };
                let other = v.skip_back(other, PASSTHROUGH);
                let Some((g, "Gather" | "GatherND")) = v.producer(other) else {
                    return;
                };
                let stacked = v.input(g, 0);
                let dims = const_dims(v.g, stacked).unwrap_or_default();
                if is_const(v.g, stacked)
                    && dims == [n as i64, l.w.shape[0] as i64]
                    && sel.contains(v.skip_back(v.input(g, 1), PASSTHROUGH))
                {
                    l.bias = Some(BiasRef {
                        tensor: stacked.to_string(),
                        expert: Some(0),
                        rows: None,
                        len: l.w.shape[0],
                    });
                    l.out = v.output(*c, 0).to_string();
                }
                return;
            }
            _ => return,
        }
    }
}

/// If node `a` selects one expert's mask row (`Gather(mask, e)` or `Equal(ids, e)`), the
/// expert index, and whether it came from a baked `Split` rather than a constant.
fn expert_index(v: &View, a: NodeId, sel: &HashSet<&str>) -> Option<(usize, bool)> {
    match v.op(a) {
        "Gather" => {
            let data = v.input(a, 0);
            if !sel.contains(data) || v.producer(data).is_some_and(|(_, op)| op == "Shape") {
                return None;
            }
            let idx = v.input(a, 1);
            if let Some(e) = const_scalar_int(v.g, idx) {
                return usize::try_from(e).ok().map(|e| (e, false));
            }
            split_position(v, idx, sel).map(|i| (i, true))
        }
        "Equal" => {
            let (p, q) = (v.input(a, 0), v.input(a, 1));
            let (ids, c) = if sel.contains(p) { (p, q) } else { (q, p) };
            if !sel.contains(ids) {
                return None;
            }
            const_scalar_int(v.g, c)
                .and_then(|e| usize::try_from(e).ok())
                .map(|e| (e, false))
        }
        _ => None,
    }
}

/// transformers' `for expert_idx in expert_hit` traced by TorchScript: the index is output
/// `i` of a Split over NonZero(hit mask) whose sizes were baked at trace time (through
/// reshapes, and through transformers 5's `expert_idx[0]`, a Gather of element 0). Returns
/// `i`: the chain's expert when every expert was hit at export.
fn split_position(v: &View, idx: &str, sel: &HashSet<&str>) -> Option<usize> {
    let mut src = v.skip_back(idx, PASSTHROUGH);
    if let Some((g, "Gather")) = v.producer(src) {
        if const_scalar_int(v.g, v.input(g, 1)) == Some(0)
            && v.attr_int(g, "axis").unwrap_or(0) == 0
        {
            src = v.skip_back(v.input(g, 0), PASSTHROUGH);
        }
    }
    let (s, op) = v.producer(src)?;
    if op == "Split" && sel.contains(v.input(s, 0)) {
        return v.node(s).output.iter().position(|o| o == src);
    }
    None
}

/// MatMul(x, W[e]) (or `W[e]ᵀ` through a Transpose) where `W[e]` is one expert's slice of a
/// stacked 3-D constant, gathered by a scalar index: a constant, or the position of a baked
/// `Split` (transformers 5's eager expert loop traced by TorchScript; the exporter did not
/// fold the slice). Returns the linear (its weight names expert `e`), `e`, and whether
/// the index came from a baked Split.
fn linear_sliced(v: &View, id: NodeId, sel: &HashSet<&str>) -> Option<(Linear, usize, bool)> {
    if v.op(id) != "MatMul" {
        return None;
    }
    let data = v.input(id, 0);
    let mut w = v.skip_back(v.input(id, 1), &["Cast", "Identity"]);
    let mut transposed = false;
    if let Some((t, "Transpose")) = v.producer(w) {
        let perm = v.attr_ints(t, "perm");
        if perm.as_deref().is_some_and(|p| p != [1, 0]) {
            return None;
        }
        transposed = true;
        w = v.skip_back(v.input(t, 0), &["Cast", "Identity"]);
    }
    let (g, op) = v.producer(w)?;
    if op != "Gather" || v.attr_int(g, "axis").unwrap_or(0) != 0 {
        return None;
    }
    let stacked = v.input(g, 0);
    let dims = const_dims(v.g, stacked).filter(|d| d.len() == 3 && is_const(v.g, stacked))?;
    let idx = v.input(g, 1);
    let (e, spec) = match const_scalar_int(v.g, idx) {
        Some(e) => (usize::try_from(e).ok()?, false),
        None => (split_position(v, idx, sel)?, true),
    };
    let (a, b) = (dims[1] as usize, dims[2] as usize);
    // W[e] is [a, b]: used as W[e]ᵀ (x·W[e]ᵀ) it is canonical [out=a, in=b]; used as is
    // (x·W[e]) it is stored [in=a, out=b].
    let (shape, transpose) = if transposed {
        ([a, b], false)
    } else {
        ([b, a], true)
    };
    let mut l = Linear::new(
        v,
        id,
        data,
        WeightRef {
            tensor: stacked.to_string(),
            expert: Some(e),
            transpose,
            rows: None,
            shape,
            quant: None,
        },
    );
    attach_bias(v, &mut l);
    if l.bias.is_none() {
        attach_gathered_bias(v, &mut l, e, sel);
    }
    Some((l, e, spec))
}

/// A following Add of `Gather(B[N, out], i)` with `i` naming the same expert `e` as the
/// weight (gpt-oss's `gate_up_proj_bias[expert_idx]` in the stock loop) is the bias.
fn attach_gathered_bias(v: &View, l: &mut Linear, e: usize, sel: &HashSet<&str>) {
    let Some((add, other)) = sole_add(v, &l.out) else {
        return;
    };
    let other = v.skip_back(other, &["Cast", "Identity"]);
    let Some((g, "Gather")) = v.producer(other) else {
        return;
    };
    if v.attr_int(g, "axis").unwrap_or(0) != 0 {
        return;
    }
    let stacked = v.input(g, 0);
    let dims = const_dims(v.g, stacked).unwrap_or_default();
    if !is_const(v.g, stacked) || dims.len() != 2 || dims[1] != l.w.shape[0] as i64 {
        return;
    }
    let idx = v.input(g, 1);
    let same = match const_scalar_int(v.g, idx) {
        Some(i) => usize::try_from(i).ok() == Some(e),
        None => split_position(v, idx, sel) == Some(e),
    };
    if same {
        l.bias = Some(BiasRef {
            tensor: stacked.to_string(),
            expert: Some(e),
            rows: None,
            len: l.w.shape[0],
        });
        l.out = v.output(add, 0).to_string();
    }
}

/// If a Mul downstream of `value` scales it by one column of a routing-weight matrix
/// derived from the selection (`Slice(w, e, e+1, axis 1)` or `Gather(w, e, axis 1)`), that
/// column's index.
fn dense_column_of(
    v: &View,
    within: &HashSet<NodeId>,
    value: &str,
    sel: &HashSet<&str>,
) -> Option<usize> {
    let mut found = HashSet::new();
    for id in v.forward_cone(&[value], Some(within)) {
        if v.op(id) != "Mul" {
            continue;
        }
        for side in 0..2 {
            let operand = v.skip_back(v.input(id, side), PASSTHROUGH);
            let Some((p, op)) = v.producer(operand) else {
                continue;
            };
            let data = v.input(p, 0);
            if !sel.contains(data) {
                continue;
            }
            let e = match op {
                "Slice" => {
                    let start = const_scalar_int(v.g, v.input(p, 1));
                    let end = const_scalar_int(v.g, v.input(p, 2));
                    let axis = if v.input(p, 3).is_empty() {
                        Some(0)
                    } else {
                        const_scalar_int(v.g, v.input(p, 3))
                    };
                    match (start, end, axis) {
                        (Some(s), Some(e), Some(1 | -1)) if e == s + 1 => Some(s),
                        _ => None,
                    }
                }
                "Gather" if matches!(v.attr_int(p, "axis"), Some(1 | -1)) => {
                    const_scalar_int(v.g, v.input(p, 1))
                }
                _ => None,
            };
            if let Some(e) = e.and_then(|e| usize::try_from(e).ok()) {
                found.insert(e);
            }
        }
    }
    if found.len() == 1 {
        found.into_iter().next()
    } else {
        None
    }
}

/// Op types on the paths from value `from` to value `to`.
fn path_ops<'g>(v: &View<'g>, within: &HashSet<NodeId>, from: &str, to: &str) -> Vec<&'g str> {
    let fwd = v.forward_cone(&[from], Some(within));
    let back = v.ancestors(to, within, &HashSet::new());
    let mut ops: Vec<_> = fwd.intersection(&back).map(|&id| v.op(id)).collect();
    ops.sort();
    ops
}

const NONLINEAR: &[&str] = &[
    "Relu",
    "Erf",
    "Tanh",
    "Sigmoid",
    "Gelu",
    "Silu",
    "Swish",
    "HardSigmoid",
    "Softplus",
];

fn nonlinear(ops: &[&str]) -> bool {
    ops.iter().any(|o| NONLINEAR.contains(o))
}

fn classify(v: &View, within: &HashSet<NodeId>, from: &str, ops: &[&str]) -> Result<Act, String> {
    let has = |o: &str| ops.contains(&o);
    if has("Relu") {
        return Ok(Act::Relu);
    }
    if has("Erf") {
        return Ok(Act::Gelu);
    }
    if has("Tanh") {
        return Ok(Act::GeluTanh);
    }
    if has("Gelu") {
        let g = v
            .forward_cone(&[from], Some(within))
            .into_iter()
            .find(|&id| v.op(id) == "Gelu");
        let tanh = g
            .and_then(|g| v.attr_str(g, "approximate"))
            .is_some_and(|a| a == "tanh");
        return Ok(if tanh { Act::GeluTanh } else { Act::Gelu });
    }
    if has("Silu") || has("Swish") {
        return Ok(Act::Silu);
    }
    if has("Sigmoid") {
        // x·sigmoid(x): the Sigmoid must read the same value the Mul multiplies.
        let sig = v
            .forward_cone(&[from], Some(within))
            .into_iter()
            .find(|&id| v.op(id) == "Sigmoid")
            .ok_or("sigmoid not found")?;
        let sin = v.skip_back(v.input(sig, 0), &["Cast", "Identity"]);
        if sin == v.skip_back(from, &["Cast", "Identity"]) || sin == from {
            return Ok(Act::Silu);
        }
        return Err(
            "sigmoid-based activation with a scaled input (e.g. x·σ(1.702x)) is not supported yet"
                .into(),
        );
    }
    if nonlinear(ops) {
        return Err(format!("unsupported activation ops {ops:?}"));
    }
    Ok(Act::Identity)
}

/// gpt-oss's clamped SwiGLU over separate gate and up projections (`g' = min(g, L)` by
/// Min or Clip; `g'·σ(alpha·g')`; `u' = clamp(u, -L, L)` by Min/Max or Clip, plus `beta`; the
/// product): as smoe-opt writes it and as torch exports gpt-oss's expert. None when the
/// graph is not exactly that.
fn clamped_swiglu(v: &View, within: &HashSet<NodeId>, gate: &str, up: &str) -> Option<Act> {
    let scalar = |value: &str| consts::const_scalar_float(v.g, value);
    let within_op = |id: NodeId| within.contains(&id);
    // Upper bound applied to `value` by a single consumer Min(value, c) / Clip(value, _, c).
    let upper = |value: &str| -> Option<(String, f32, Option<f32>)> {
        let cons = v.consumers(value);
        let [c] = cons else { return None };
        if !within_op(*c) {
            return None;
        }
        match v.op(*c) {
            "Min" => {
                let other = if v.input(*c, 0) == value {
                    v.input(*c, 1)
                } else {
                    v.input(*c, 0)
                };
                Some((v.output(*c, 0).to_string(), scalar(other)?, None))
            }
            "Clip" => {
                let lo = v
                    .node(*c)
                    .input
                    .get(1)
                    .filter(|s| !s.is_empty())
                    .and_then(|s| scalar(s));
                let hi = scalar(v.node(*c).input.get(2)?)?;
                Some((v.output(*c, 0).to_string(), hi, lo))
            }
            _ => None,
        }
    };
    // Gate: optional clamp, then Sigmoid(Mul(g', alpha)) and Mul(g', σ).
    let (g, g_limit) = match upper(gate) {
        Some((out, hi, None)) => (out, Some(hi)),
        Some(_) => return None,
        None => (gate.to_string(), None),
    };
    let mut alpha = None;
    for &c in v.consumers(&g) {
        if v.op(c) != "Mul" || !within_op(c) {
            continue;
        }
        let other = if v.input(c, 0) == g {
            v.input(c, 1)
        } else {
            v.input(c, 0)
        };
        if let Some(a) = scalar(other) {
            let scaled = v.output(c, 0);
            let sig = v
                .consumers(scaled)
                .iter()
                .copied()
                .find(|&s| v.op(s) == "Sigmoid")?;
            let sv = v.output(sig, 0);
            v.consumers(sv)
                .iter()
                .find(|&&m| v.op(m) == "Mul" && (v.input(m, 0) == g || v.input(m, 1) == g))?;
            alpha = Some(a);
        }
    }
    let alpha = alpha?;
    // Up: optional clamp to [-L, L], optional + beta.
    let mut u = up.to_string();
    let mut u_limit = None;
    if let Some((out, hi, lo)) = upper(&u) {
        let lo = match lo {
            Some(lo) => lo,
            None => {
                // Min then Max(·, -L).
                let cons = v.consumers(&out);
                let [m] = cons else { return None };
                if v.op(*m) != "Max" {
                    return None;
                }
                let other = if v.input(*m, 0) == out {
                    v.input(*m, 1)
                } else {
                    v.input(*m, 0)
                };
                u = v.output(*m, 0).to_string();
                scalar(other)?
            }
        };
        if u == up {
            u = out;
        }
        if lo != -hi {
            return None;
        }
        u_limit = Some(hi);
    }
    let mut beta = 0.0;
    let cons = v.consumers(&u);
    if let [a] = cons {
        if v.op(*a) == "Add" {
            let other = if v.input(*a, 0) == u {
                v.input(*a, 1)
            } else {
                v.input(*a, 0)
            };
            beta = scalar(other)?;
        }
    }
    if g_limit != u_limit || (alpha == 1.0 && beta == 0.0 && g_limit.is_none()) {
        return None;
    }
    Some(Act::SwigluClamped {
        alpha,
        beta,
        limit: g_limit,
    })
}

/// Builds an FFN from its linear layers.
fn ffn_from(v: &View, within: &HashSet<NodeId>, uses: &[Linear]) -> Result<Ffn, String> {
    let nodes: HashSet<NodeId> = uses.iter().map(|l| l.node).collect();
    let mut first = Vec::new();
    let mut down = Vec::new();
    for l in uses {
        let anc = v.ancestors(&l.data, within, &HashSet::new());
        if anc.iter().any(|a| nodes.contains(a)) {
            down.push(l.clone());
        } else {
            first.push(l.clone());
        }
    }
    let [down] = down.as_slice() else {
        return Err(format!(
            "expected one down projection, found {}",
            down.len()
        ));
    };
    let inter = down.w.shape[1];
    match first.as_slice() {
        [a, b] => {
            let oa = path_ops(v, within, &a.out, &down.data);
            let ob = path_ops(v, within, &b.out, &down.data);
            let (gate, up, ops) = match (nonlinear(&oa), nonlinear(&ob)) {
                (true, false) => (a, b, oa),
                (false, true) => (b, a, ob),
                _ => return Err("cannot tell the gate from the up projection".into()),
            };
            if gate.w.shape[0] != inter || up.w.shape[0] != inter {
                return Err("gate/up widths differ from the down projection's input".into());
            }
            let act = match classify(v, within, &gate.out, &ops) {
                Ok(a) => a,
                Err(e) => clamped_swiglu(v, within, &gate.out, &up.out).ok_or(e)?,
            };
            Ok(Ffn {
                act,
                gate: Some(gate.w.clone()),
                up: up.w.clone(),
                down: down.w.clone(),
                gate_bias: gate.bias.clone(),
                up_bias: up.bias.clone(),
                down_bias: down.bias.clone(),
            })
        }
        [f] if f.w.shape[0] == inter => {
            let ops = path_ops(v, within, &f.out, &down.data);
            Ok(Ffn {
                act: classify(v, within, &f.out, &ops)?,
                gate: None,
                up: f.w.clone(),
                down: down.w.clone(),
                gate_bias: None,
                up_bias: f.bias.clone(),
                down_bias: down.bias.clone(),
            })
        }
        [f] if f.w.shape[0] == 2 * inter => {
            let halves = halves(v, &f.out, inter)?;
            let mut gate = None;
            let mut up = None;
            let mut failed = None;
            for (val, sel) in &halves {
                let ops = path_ops(v, within, val, &down.data);
                if nonlinear(&ops) {
                    match classify(v, within, val, &ops) {
                        Ok(act) => gate = Some((*sel, act)),
                        Err(e) => failed = Some(e),
                    }
                } else {
                    up = Some(*sel);
                }
            }
            if failed.is_some() || gate.is_none() || up.is_none() {
                // gpt-oss: both halves are clamped, the gate's through x·σ(αx).
                let (a, b) = (&halves[0], &halves[1]);
                let found = clamped_swiglu(v, within, &a.0, &b.0)
                    .map(|act| (a.1, act, b.1))
                    .or_else(|| clamped_swiglu(v, within, &b.0, &a.0).map(|act| (b.1, act, a.1)));
                match (found, failed) {
                    (Some((g, act, u)), _) => {
                        gate = Some((g, act));
                        up = Some(u);
                    }
                    (None, Some(e)) => return Err(e),
                    (None, None) => {}
                }
            }
            let (Some((gsel, act)), Some(usel)) = (gate, up) else {
                return Err(
                    "cannot tell the gate half from the up half of the fused projection".into(),
                );
            };
            let pick = |sel: RowSel| WeightRef {
                rows: Some(sel),
                shape: [inter, f.w.shape[1]],
                quant: None,
                ..f.w.clone()
            };
            let pick_b = |sel: RowSel| {
                f.bias.as_ref().map(|b| BiasRef {
                    rows: Some(sel),
                    len: inter,
                    ..b.clone()
                })
            };
            Ok(Ffn {
                act,
                gate: Some(pick(gsel)),
                up: pick(usel),
                down: down.w.clone(),
                gate_bias: pick_b(gsel),
                up_bias: pick_b(usel),
                down_bias: down.bias.clone(),
            })
        }
        _ => Err(format!(
            "{} first-layer projections of unexpected widths",
            first.len()
        )),
    }
}

/// The two halves a fused gate|up output is split into (Slice pair or Split), with the
/// rows each takes.
fn halves(v: &View, value: &str, inter: usize) -> Result<Vec<(String, RowSel)>, String> {
    let mut frontier = vec![value.to_string()];
    let mut out = Vec::new();
    while let Some(val) = frontier.pop() {
        for &c in v.consumers(&val) {
            match v.op(c) {
                "Split" => {
                    let outs = &v.node(c).output;
                    if outs.len() != 2 {
                        return Err("fused projection split into more than two parts".into());
                    }
                    out.push((outs[0].clone(), RowSel { start: 0, step: 1 }));
                    out.push((
                        outs[1].clone(),
                        RowSel {
                            start: inter,
                            step: 1,
                        },
                    ));
                }
                "Slice" => {
                    let step = if v.input(c, 4).is_empty() {
                        Some(1)
                    } else {
                        const_scalar_int(v.g, v.input(c, 4))
                    };
                    let start = const_scalar_int(v.g, v.input(c, 1));
                    let sel = match (start, step) {
                        (Some(0), Some(1)) => RowSel { start: 0, step: 1 },
                        (Some(s), Some(1)) if s as usize == inter => RowSel {
                            start: inter,
                            step: 1,
                        },
                        (None, Some(1)) => RowSel {
                            start: inter,
                            step: 1,
                        },
                        (Some(s @ (0 | 1)), Some(2)) => RowSel {
                            start: s as usize,
                            step: 2,
                        },
                        _ => return Err("unrecognised slice of the fused projection".into()),
                    };
                    out.push((v.output(c, 0).to_string(), sel));
                }
                op if PASSTHROUGH.contains(&op) => frontier.push(v.output(c, 0).to_string()),
                _ => {}
            }
        }
    }
    if out.len() != 2 || out[0].1 == out[1].1 {
        return Err(format!(
            "fused gate/up projection: found {} distinct halves",
            out.len()
        ));
    }
    Ok(out)
}

fn with_expert(t: &Ffn, e: usize) -> Ffn {
    let w = |r: &WeightRef| WeightRef {
        expert: Some(e),
        ..r.clone()
    };
    let b = |r: &Option<BiasRef>| {
        r.as_ref().map(|b| BiasRef {
            expert: Some(e),
            ..b.clone()
        })
    };
    Ffn {
        gate: t.gate.as_ref().map(w),
        up: w(&t.up),
        down: w(&t.down),
        gate_bias: b(&t.gate_bias),
        up_bias: b(&t.up_bias),
        down_bias: b(&t.down_bias),
        act: t.act,
    }
}

/// Shared experts: linear layers reading the block input directly; a `[1, H]` projection
/// followed by Sigmoid is the shared expert's gate.
fn shared_experts(
    v: &View,
    within: &HashSet<NodeId>,
    uses: Vec<Linear>,
) -> Result<Vec<SharedExpert>, String> {
    if uses.is_empty() {
        return Ok(vec![]);
    }
    let (gates, rest): (Vec<_>, Vec<_>) = uses.into_iter().partition(|l| {
        l.w.shape[0] == 1 && v.consumers(&l.out).iter().any(|&c| v.op(c) == "Sigmoid")
    });
    if gates.len() > 1 {
        return Err("several shared-expert gates".into());
    }
    let ffn = ffn_from(v, within, &rest).map_err(|e| format!("shared expert: {e}"))?;
    Ok(vec![SharedExpert {
        ffn,
        gate: gates.into_iter().next().map(|g| g.w),
    }])
}

//! Router recognition: from a `TopK`/`ArgMax` back to the router MatMul, and forward to
//! renormalisation and Switch capacity.
use super::block::{BiasRef, Groups, Router, Scoring, WeightRef};
use super::consts::{const_dims, const_ints, const_scalar_float, const_scalar_int, is_const};
use super::view::View;
use crate::ir::NodeId;

/// What router recognition found.
pub struct FoundRouter {
    /// The router description.
    pub router: Router,
    /// The router MatMul/Gemm node.
    pub matmul: NodeId,
    /// The router's data input (flattened hidden states).
    pub x_in: String,
    /// The selected expert indices.
    pub indices: String,
    /// Selection nodes inside the router itself (the group top-ks of a group-limited router).
    pub inner: Vec<NodeId>,
}

const PASS: &[&str] = &["Cast", "Identity"];

/// Prefix of the rejections that come after the router MatMul was found: the node IS an MoE
/// router whose parts disagree (top-k larger than the experts, a bias of the wrong length),
/// which detection reports as a diagnostic rather than a silent near-miss.
pub const INCONSISTENT: &str = "an MoE router whose parts disagree: ";

/// Recognises the router feeding the selection node `sel` (TopK or ArgMax).
pub fn analyze(v: &View, sel: NodeId) -> Result<FoundRouter, String> {
    let op = v.op(sel);
    let (k, indices) = match op {
        "TopK" => {
            let k = const_scalar_int(v.g, v.input(sel, 1)).ok_or("TopK's k is not a constant")?;
            if v.attr_int(sel, "largest") == Some(0) {
                return Err("TopK selects the smallest values".into());
            }
            (k as usize, v.output(sel, 1).to_string())
        }
        "ArgMax" => {
            if v.attr_int(sel, "select_last_index") == Some(1) {
                return Err("ArgMax selects the last index".into());
            }
            (1, v.output(sel, 0).to_string())
        }
        _ => return Err(format!("{op} is not a selection op")),
    };
    // PhiMoE's sparsemixer: two argmaxes, the second over the logits without the first.
    let sm = if op == "ArgMax" {
        sparsemixer(v, sel)
    } else {
        None
    };
    let (k, indices) = match &sm {
        Some(s) => (2, s.indices.clone()),
        None => (k, indices),
    };
    // Back from the scores to the logits, through DeepSeek-V3's group mask and selection bias.
    let mut scores = v.skip_back(v.input(sel, 0), PASS);
    let mut groups = None;
    let mut inner = Vec::new();
    if let Some(s) = &sm {
        inner.push(s.second);
    }
    if let Some((w, "Where")) = v.producer(scores).filter(|_| sm.is_none()) {
        let (choice, g, tops) = group_mask(v, w)?;
        groups = Some(g);
        inner = tops;
        scores = choice;
    }
    let mut selection_bias = None;
    if let Some((add, "Add")) = v.producer(scores).filter(|_| sm.is_none()) {
        if op == "TopK" {
            if let Some((c, other)) = const_operand(v, add) {
                let other = v.skip_back(other, PASS);
                if v.producer(other).is_some_and(|(_, p)| p == "Sigmoid") {
                    let len = const_dims(v.g, c)
                        .unwrap_or_default()
                        .iter()
                        .product::<i64>();
                    selection_bias = Some((c.to_string(), len as usize, other.to_string()));
                    scores = other;
                }
            }
        }
    }
    if groups.is_some() && selection_bias.is_none() {
        return Err("group-limited selection without sigmoid scores plus a selection bias".into());
    }
    let mut scoring = Scoring::Softmax;
    match v.producer(scores) {
        _ if sm.is_some() => scoring = Scoring::Sparsemixer,
        Some((id, "Softmax")) => {
            scores = v.skip_back(v.input(id, 0), PASS);
            let axis = v.attr_int(id, "axis").unwrap_or(-1);
            if axis != -1 && axis != 1 {
                return Err(format!("router softmax over axis {axis}"));
            }
        }
        Some((id, "Sigmoid")) => {
            scoring = Scoring::Sigmoid;
            scores = v.skip_back(v.input(id, 0), PASS);
        }
        _ if op == "TopK" => {
            // gpt-oss: top-k on logits, softmax over the k chosen values.
            let vals = v.output(sel, 0);
            let soft = v.consumers(vals).iter().any(|&c| v.op(c) == "Softmax");
            if !soft {
                return Err("selection is not over softmax/sigmoid scores of the logits".into());
            }
            scoring = Scoring::SoftmaxAfterTopk;
        }
        _ => return Err("selection is not over softmax/sigmoid scores of the logits".into()),
    }
    let logits = scores;
    let mut bias = None;
    let mut cur = logits;
    let (mm, mop) = loop {
        match v.producer(cur) {
            Some((id, "Add")) => {
                let (a, b) = (v.input(id, 0), v.input(id, 1));
                let (c, other) = if is_const(v.g, b) {
                    (b, a)
                } else if is_const(v.g, a) {
                    (a, b)
                } else {
                    return Err("router logits come from an Add of two computed values".into());
                };
                let d = const_dims(v.g, c).unwrap_or_default();
                bias = Some((c.to_string(), d.iter().product::<i64>() as usize));
                cur = v.skip_back(other, PASS);
            }
            Some((id, op @ ("MatMul" | "Gemm"))) => break (id, op),
            Some((_, op)) => {
                return Err(format!("router logits come from {op}, not a MatMul/Gemm"))
            }
            None => return Err("router logits are a graph input".into()),
        }
    };
    let (x_in, w) = (v.input(mm, 0), v.input(mm, 1));
    if !is_const(v.g, w) {
        return Err("router MatMul has no constant weight".into());
    }
    let dims = const_dims(v.g, w).unwrap_or_default();
    if dims.len() != 2 {
        return Err(format!("router weight has dims {dims:?}, expected 2-D"));
    }
    let trans_b = mop == "Gemm" && v.attr_int(mm, "transB") == Some(1);
    if mop == "Gemm" && v.attr_int(mm, "transA") == Some(1) {
        return Err("router Gemm transposes its input".into());
    }
    let (n, h) = if trans_b {
        (dims[0], dims[1])
    } else {
        (dims[1], dims[0])
    };
    if mop == "Gemm" && !v.input(mm, 2).is_empty() {
        let c = v.input(mm, 2);
        bias = Some((
            c.to_string(),
            const_dims(v.g, c)
                .unwrap_or_default()
                .iter()
                .product::<i64>() as usize,
        ));
    }
    let (n, h) = (n as usize, h as usize);
    if k == 0 || k > n {
        return Err(format!(
            "{INCONSISTENT}top-k {k} does not fit its {n} experts"
        ));
    }
    if bias.as_ref().is_some_and(|(_, len)| *len != n) {
        return Err(format!(
            "{INCONSISTENT}the router bias length differs from the number of experts ({n})"
        ));
    }
    // The weights: the TopK values, or (with a selection bias) the unbiased scores gathered
    // at the chosen indices.
    let vals = match &selection_bias {
        None => v.output(sel, 0).to_string(),
        Some((_, _, sig)) => v
            .consumers(&indices)
            .iter()
            .find(|&&c| v.op(c) == "GatherElements" && v.skip_back(v.input(c, 0), PASS) == sig)
            .map(|&c| v.output(c, 0).to_string())
            .ok_or("a selection bias is added to the scores, but the weights are not the unbiased scores")?,
    };
    if let Some((_, len, _)) = &selection_bias {
        if *len != n {
            return Err(format!(
                "{INCONSISTENT}the selection bias has {len} elements, not one per expert ({n})"
            ));
        }
    }
    if let Some(g) = groups {
        if g.count == 0 || n % g.count != 0 || g.top == 0 || g.top > g.count {
            return Err(format!(
                "{} expert groups (top {}) do not divide {n} experts",
                g.count, g.top
            ));
        }
        if k > g.top * (n / g.count) {
            return Err(format!(
                "top-{k} from {} groups of {} experts",
                g.top,
                n / g.count
            ));
        }
    }
    let (renorm, normed) = if scoring == Scoring::Sparsemixer {
        (false, None)
    } else if scoring == Scoring::SoftmaxAfterTopk {
        (true, None)
    } else if op == "TopK" {
        match renormalised(v, &vals) {
            Some(d) => (true, Some(d)),
            None => (false, None),
        }
    } else {
        (false, None)
    };
    let scale = if selection_bias.is_some() {
        routed_scale(v, normed.as_deref().unwrap_or(&vals))
    } else {
        1.0
    };
    let renormalize = renorm;
    let capacity = capacity(v, &indices);
    Ok(FoundRouter {
        router: Router {
            weight: WeightRef {
                tensor: w.to_string(),
                expert: None,
                transpose: !trans_b,
                rows: None,
                shape: [n, h],
                quant: None,
            },
            bias: bias.map(|(tensor, len)| BiasRef {
                tensor,
                expert: None,
                rows: None,
                len,
            }),
            num_experts: n,
            top_k: k,
            scoring,
            renormalize,
            capacity,
            selection_bias: selection_bias.map(|(tensor, len, _)| BiasRef {
                tensor,
                expert: None,
                rows: None,
                len,
            }),
            groups,
            scale,
            jitter_eps: sm.as_ref().map(|s| s.eps),
            logits: logits.to_string(),
        },
        matmul: mm,
        x_in: x_in.to_string(),
        indices,
        inner,
    })
}

/// What the sparsemixer recogniser found.
struct Sparsemixer {
    /// `Concat(first, second)` of the two picks' expert ids.
    indices: String,
    /// The second ArgMax.
    second: NodeId,
    /// The jitter eps (half the constant the relative gaps are compared with).
    eps: f32,
}

/// PhiMoE's sparsemixer from its first ArgMax `a1` over logits `z`: `z2 =
/// ScatterElements(z, a1, −inf)`, `a2 = ArgMax(z2)`, ids `Concat(a1, a2)`, and each pick's
/// weight `GatherElements(Softmax(Where(Greater(Div(Sub(max, z), Max(Abs(z), max)), 2·eps),
/// −inf, ·)), a)` (TorchScript and dynamo write the same ops, casts aside).
fn sparsemixer(v: &View, a1: NodeId) -> Option<Sparsemixer> {
    let z = v.skip_back(v.input(a1, 0), PASS);
    let i1 = v.output(a1, 0);
    let scatter = v.consumers(i1).iter().copied().find(|&c| {
        v.op(c) == "ScatterElements" && v.input(c, 1) == i1 && v.skip_back(v.input(c, 0), PASS) == z
    })?;
    let z2 = v.output(scatter, 0);
    let a2 = v
        .consumers(z2)
        .iter()
        .copied()
        .find(|&c| v.op(c) == "ArgMax")?;
    let i2 = v.output(a2, 0);
    let indices = v
        .consumers(i1)
        .iter()
        .copied()
        .find(|&c| v.op(c) == "Concat" && v.input(c, 0) == i1 && v.input(c, 1) == i2)
        .map(|c| v.output(c, 0).to_string())?;
    // The eps: a Greater against a constant inside the first pick's mask.
    let mut eps = None;
    for &c in v.consumers(z) {
        if v.op(c) != "Abs" {
            continue;
        }
        for &m in v.consumers(v.output(c, 0)) {
            for &d in v.consumers(v.output(m, 0)) {
                for &gt in v.consumers(v.output(d, 0)) {
                    if v.op(gt) == "Greater" {
                        eps = super::consts::const_scalar_float(v.g, v.input(gt, 1));
                    }
                }
            }
        }
    }
    Some(Sparsemixer {
        indices,
        second: a2,
        eps: eps? / 2.0,
    })
}

/// `vals` → (Cast) → ReduceSum → [Add(ε)] → Div(vals, sum): the weights renormalised to sum
/// to 1. Returns the Div's output.
fn renormalised(v: &View, vals0: &str) -> Option<String> {
    let mut vals = vec![vals0];
    for &c in v.consumers(vals0) {
        if PASS.contains(&v.op(c)) {
            vals.push(v.output(c, 0));
        }
    }
    for val in &vals {
        for &r in v.consumers(val) {
            if v.op(r) != "ReduceSum" {
                continue;
            }
            let mut sums = vec![v.output(r, 0)];
            for &a in v.consumers(v.output(r, 0)) {
                // DeepSeek-V3 adds 1e-20 to the sum (no effect on positive f32 sums).
                if v.op(a) == "Add" && const_operand(v, a).is_some() {
                    sums.push(v.output(a, 0));
                }
            }
            for sum in sums {
                for &d in v.consumers(sum) {
                    if v.op(d) == "Div" && v.input(d, 1) == sum && vals.contains(&v.input(d, 0)) {
                        return Some(v.output(d, 0).to_string());
                    }
                }
            }
        }
    }
    None
}

/// The routed scaling factor: a Mul of the weights by a constant scalar (1 if none).
fn routed_scale(v: &View, weights: &str) -> f32 {
    v.consumers(weights)
        .iter()
        .filter(|&&m| v.op(m) == "Mul")
        .find_map(|&m| {
            let (c, _) = const_operand(v, m)?;
            const_scalar_float(v.g, c)
        })
        .unwrap_or(1.0)
}

/// The constant operand of a binary node and the other operand.
fn const_operand<'v>(v: &'v View, id: NodeId) -> Option<(&'v str, &'v str)> {
    let (a, b) = (v.input(id, 0), v.input(id, 1));
    if is_const(v.g, b) {
        Some((b, a))
    } else if is_const(v.g, a) {
        Some((a, b))
    } else {
        None
    }
}

/// DeepSeek-V3's group mask: `Where(¬mask, -inf, choice)` where the mask keeps the experts
/// of the `top` best groups, a group scored by the sum of the top-2 of
/// `Reshape(choice, [-1, G, N/G])`. Returns the choice scores, the groups and the two group
/// top-k nodes.
fn group_mask<'v>(v: &'v View, w: NodeId) -> Result<(&'v str, Groups, Vec<NodeId>), String> {
    let fill = const_scalar_float(v.g, v.input(w, 1))
        .ok_or("a Where before the router's top-k does not fill with a constant")?;
    if fill > -1e30 {
        return Err(format!(
            "the router masks experts with {fill}, not -inf, before its top-k"
        ));
    }
    let choice = v.skip_back(v.input(w, 2), PASS);
    for &r in v.consumers(choice) {
        if v.op(r) != "Reshape" {
            continue;
        }
        let Some(shape) = const_ints(v.g, v.input(r, 1)) else {
            continue;
        };
        if shape.len() != 3 || shape[1] <= 0 {
            continue;
        }
        for &t2 in v.consumers(v.output(r, 0)) {
            if v.op(t2) != "TopK" || const_scalar_int(v.g, v.input(t2, 1)) != Some(2) {
                continue;
            }
            for &s in v.consumers(v.output(t2, 0)) {
                if v.op(s) != "ReduceSum" {
                    continue;
                }
                for &tg in v.consumers(v.output(s, 0)) {
                    if v.op(tg) != "TopK" {
                        continue;
                    }
                    let top = const_scalar_int(v.g, v.input(tg, 1))
                        .ok_or("the group top-k's k is not a constant")?;
                    return Ok((
                        choice,
                        Groups {
                            count: shape[1] as usize,
                            top: top as usize,
                        },
                        vec![t2, tg],
                    ));
                }
            }
        }
    }
    Err("a Where masks the router scores, but not by DeepSeek-V3 expert groups".into())
}

/// Switch capacity: indices → OneHot → CumSum → LessOrEqual(·, C).
fn capacity(v: &View, indices: &str) -> Option<usize> {
    for &oh in v.consumers(indices) {
        if v.op(oh) != "OneHot" {
            continue;
        }
        for &cs in v.consumers(v.output(oh, 0)) {
            if v.op(cs) != "CumSum" {
                continue;
            }
            for &le in v.consumers(v.output(cs, 0)) {
                let c = const_scalar_int(v.g, v.input(le, 1));
                match (v.op(le), c) {
                    ("LessOrEqual", Some(c)) => return Some(c as usize),
                    ("Less", Some(c)) => return Some(c as usize - 1),
                    _ => {}
                }
            }
        }
    }
    None
}

//! Router recognition: from a `TopK`/`ArgMax` back to the router MatMul, and forward to
//! renormalisation and Switch capacity.
use super::block::{BiasRef, Router, Scoring, WeightRef};
use super::consts::{const_dims, const_scalar_int, is_const};
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
}

const PASS: &[&str] = &["Cast", "Identity"];

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
    // Back from the scores to the logits.
    let mut scores = v.skip_back(v.input(sel, 0), PASS);
    let mut scoring = Scoring::Softmax;
    match v.producer(scores) {
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
        return Err(format!("top-k {k} does not fit {n} experts"));
    }
    if bias.as_ref().is_some_and(|(_, len)| *len != n) {
        return Err("router bias length differs from the number of experts".into());
    }
    let renormalize =
        scoring == Scoring::SoftmaxAfterTopk || (op == "TopK" && renormalised(v, sel));
    let capacity = capacity(v, &indices);
    Ok(FoundRouter {
        router: Router {
            weight: WeightRef {
                tensor: w.to_string(),
                expert: None,
                transpose: !trans_b,
                rows: None,
                shape: [n, h],
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
            logits: logits.to_string(),
        },
        matmul: mm,
        x_in: x_in.to_string(),
        indices,
    })
}

/// TopK values → (Cast) → ReduceSum → Div(values, sum).
fn renormalised(v: &View, sel: NodeId) -> bool {
    let mut vals = vec![v.output(sel, 0)];
    for &c in v.consumers(v.output(sel, 0)) {
        if PASS.contains(&v.op(c)) {
            vals.push(v.output(c, 0));
        }
    }
    vals.iter().any(|val| {
        v.consumers(val).iter().any(|&r| {
            v.op(r) == "ReduceSum"
                && v.consumers(v.output(r, 0)).iter().any(|&d| {
                    v.op(d) == "Div"
                        && v.input(d, 1) == v.output(r, 0)
                        && vals.contains(&v.input(d, 0))
                })
        })
    })
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

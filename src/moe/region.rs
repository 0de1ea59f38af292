//! The block's region: from its input value to the first single-exit cut after the router.
//!
//! Starting at the block input X, nodes of X's forward cone are visited in topological
//! order while tracking the values still waiting for consumers. The first point after the
//! router's selection node where exactly one value is still open, produced by the node just
//! visited, is the block output Y: every path from X into the rest of the model passes
//! through it. The region is everything visited, so no value inside it other than Y is
//! read outside it — the guard that makes replacing the region safe.
use super::view::View;
use crate::ir::NodeId;
use std::collections::{HashMap, HashSet};

/// Ops that only reshape or re-type hidden states on their way to the router.
pub const PASSTHROUGH: &[&str] = &[
    "Reshape",
    "Cast",
    "Flatten",
    "Identity",
    "Squeeze",
    "Unsqueeze",
];

/// The block input: the router input with reshapes/casts stripped.
pub fn block_input<'g>(v: &View<'g>, router_in: &'g str) -> &'g str {
    v.skip_back(router_in, PASSTHROUGH)
}

/// A closed region.
pub struct Region {
    /// Block output value.
    pub output: String,
    /// Nodes in the region, in topological order.
    pub nodes: Vec<NodeId>,
}

/// Finds the first single-exit cut of X's forward cone after `must_pass`. Fails when the
/// cone reaches another selection node (`stop_at`) or a graph output first.
pub fn close(
    v: &View,
    x: &str,
    must_pass: NodeId,
    stop_at: &HashSet<NodeId>,
) -> Result<Region, String> {
    let cone = v.forward_cone(&[x], None);
    if !cone.contains(&must_pass) {
        return Err("the router is not downstream of the block input".into());
    }
    let mut order: Vec<NodeId> = cone.into_iter().collect();
    order.sort_by_key(|&id| v.pos(id));
    let pending = |val: &str| v.consumers(val).len() + usize::from(v.g.is_output(val));
    let mut open: HashMap<String, usize> = HashMap::new();
    open.insert(x.to_string(), pending(x));
    let mut passed = false;
    let mut nodes = Vec::new();
    for id in order {
        if stop_at.contains(&id) && id != must_pass {
            return Err("the block's region reaches another router before it closes".into());
        }
        nodes.push(id);
        passed |= id == must_pass;
        let n = v.node(id);
        let uses: HashSet<String> = crate::ir::Graph::node_uses(n).into_iter().collect();
        for u in uses {
            if let Some(c) = open.get_mut(&u) {
                *c -= 1;
                if *c == 0 {
                    open.remove(&u);
                }
            }
        }
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            let c = pending(o);
            if c > 0 {
                open.insert(o.clone(), c);
            }
        }
        if passed && open.len() == 1 {
            let (val, _) = open.iter().next().unwrap();
            if n.output.contains(val) {
                let mut output = val.clone();
                extend_tail(v, &mut output, &mut nodes);
                return Ok(Region { output, nodes });
            }
        }
    }
    Err("the block input's consumers never reconverge into a single output".into())
}

/// Ops that may follow the first cut and still belong to the block: the k-slot reduction
/// and reshapes back to the input's layout (batched forms cut before summing the slots).
const TAIL: &[&str] = &[
    "Reshape",
    "ReduceSum",
    "Cast",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Flatten",
];

fn extend_tail(v: &View, output: &mut String, nodes: &mut Vec<NodeId>) {
    loop {
        let cons = v.consumers(output);
        if cons.len() != 1 || v.g.is_output(output) {
            return;
        }
        let c = cons[0];
        if !TAIL.contains(&v.op(c)) {
            return;
        }
        let others_ok = v
            .node(c)
            .input
            .iter()
            .filter(|i| *i != output && !i.is_empty())
            .all(|i| shape_only(v, i));
        if !others_ok {
            return;
        }
        nodes.push(c);
        *output = v.output(c, 0).to_string();
    }
}

/// Whether a value is computed only from constants and tensor shapes (never from data).
fn shape_only(v: &View, value: &str) -> bool {
    let mut stack = vec![value.to_string()];
    let mut seen = HashSet::new();
    while let Some(val) = stack.pop() {
        if !seen.insert(val.clone()) || seen.len() > 256 {
            if seen.len() > 256 {
                return false;
            }
            continue;
        }
        if super::consts::is_const(v.g, &val) {
            continue;
        }
        match v.producer(&val) {
            None => return false,
            Some((_, "Shape" | "Size")) => {}
            Some((id, _)) => {
                stack.extend(v.node(id).input.iter().filter(|i| !i.is_empty()).cloned())
            }
        }
    }
    true
}

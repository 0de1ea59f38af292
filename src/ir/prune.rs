//! Dead code: nodes whose outputs nobody reads, and initializers nobody uses.
use super::{Graph, NodeId, Patch};
use std::collections::HashSet;

/// A patch removing every node none of whose outputs reaches a graph output, and every
/// initializer no remaining node reads. ONNX ops have no side effects, so this is exact.
pub fn prune(g: &Graph, label: &str) -> Patch {
    let mut live_values: HashSet<String> =
        g.outputs().iter().filter_map(|v| v.name.clone()).collect();
    let mut dead: Vec<NodeId> = Vec::new();
    let nodes: Vec<_> = g.nodes().collect();
    for (id, n) in nodes.iter().rev() {
        if n.output.iter().any(|o| live_values.contains(o)) {
            live_values.extend(Graph::node_uses(n));
        } else {
            dead.push(*id);
        }
    }
    let mut p = Patch::new(label);
    for id in dead {
        p.remove_node(id);
    }
    for init in g.initializers() {
        let name = init.name();
        if !live_values.contains(name) && !g.is_input(name) {
            p.remove_initializer(name);
        }
    }
    p
}

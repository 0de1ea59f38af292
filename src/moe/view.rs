//! Read-only graph queries the recognisers share: op types, node positions, cones.
use crate::ir::{Graph, NodeId};
use crate::onnx::proto::NodeProto;
use std::collections::{HashMap, HashSet, VecDeque};

/// A graph plus the node order, for structural queries.
pub struct View<'g> {
    /// The graph.
    pub g: &'g Graph,
    pos: HashMap<NodeId, usize>,
}

impl<'g> View<'g> {
    /// Indexes `g`.
    pub fn new(g: &'g Graph) -> Self {
        let pos = g.nodes().enumerate().map(|(i, (id, _))| (id, i)).collect();
        View { g, pos }
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> &'g NodeProto {
        self.g.node(id).expect("live node")
    }

    /// Its op type.
    pub fn op(&self, id: NodeId) -> &'g str {
        self.node(id).op_type.as_deref().unwrap_or("")
    }

    /// Position in topological order.
    pub fn pos(&self, id: NodeId) -> usize {
        self.pos[&id]
    }

    /// The producer of `value`, with its op type.
    pub fn producer(&self, value: &str) -> Option<(NodeId, &'g str)> {
        let id = self.g.producer(value)?;
        Some((id, self.op(id)))
    }

    /// Consumers of `value`.
    pub fn consumers(&self, value: &str) -> &'g [NodeId] {
        self.g.consumers(value)
    }

    /// Input `i` of a node ("" when absent).
    pub fn input(&self, id: NodeId, i: usize) -> &'g str {
        self.node(id).input.get(i).map(String::as_str).unwrap_or("")
    }

    /// Output `i` of a node ("" when absent).
    pub fn output(&self, id: NodeId, i: usize) -> &'g str {
        self.node(id)
            .output
            .get(i)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Integer attribute.
    pub fn attr_int(&self, id: NodeId, name: &str) -> Option<i64> {
        crate::ir::node_attr(self.node(id), name).and_then(|a| a.i)
    }

    /// Float attribute.
    pub fn attr_float(&self, id: NodeId, name: &str) -> Option<f32> {
        crate::ir::node_attr(self.node(id), name).and_then(|a| a.f)
    }

    /// The first element of a tensor attribute, as f32 (e.g. `ConstantOfShape`'s `value`).
    pub fn attr_tensor_f32(&self, id: NodeId, name: &str) -> Option<f32> {
        let t = crate::ir::node_attr(self.node(id), name)?.t.as_ref()?;
        let bytes = crate::onnx::tensor::inline_bytes(t).ok()?;
        crate::onnx::tensor::to_f32(t.data_type?, &bytes)?
            .first()
            .copied()
    }

    /// Integer-list attribute.
    pub fn attr_ints(&self, id: NodeId, name: &str) -> Option<Vec<i64>> {
        crate::ir::node_attr(self.node(id), name).map(|a| a.ints.clone())
    }

    /// String attribute.
    pub fn attr_str(&self, id: NodeId, name: &str) -> Option<String> {
        crate::ir::node_attr(self.node(id), name)
            .and_then(|a| a.s.as_ref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }

    /// Nodes reachable forward from `values`, optionally only inside `within`.
    pub fn forward_cone(
        &self,
        values: &[&str],
        within: Option<&HashSet<NodeId>>,
    ) -> HashSet<NodeId> {
        let mut seen = HashSet::new();
        let mut queue: VecDeque<NodeId> = values
            .iter()
            .flat_map(|v| self.consumers(v).iter().copied())
            .collect();
        while let Some(id) = queue.pop_front() {
            if within.is_some_and(|w| !w.contains(&id)) || !seen.insert(id) {
                continue;
            }
            for o in &self.node(id).output {
                queue.extend(self.consumers(o).iter().copied());
            }
        }
        seen
    }

    /// Nodes `value` depends on, inside `within`, not crossing `stop` values.
    pub fn ancestors(
        &self,
        value: &str,
        within: &HashSet<NodeId>,
        stop: &HashSet<&str>,
    ) -> HashSet<NodeId> {
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([value.to_string()]);
        while let Some(v) = queue.pop_front() {
            if stop.contains(v.as_str()) {
                continue;
            }
            let Some(id) = self.g.producer(&v) else {
                continue;
            };
            if !within.contains(&id) || !seen.insert(id) {
                continue;
            }
            queue.extend(Graph::node_uses(self.node(id)));
        }
        seen
    }

    /// Follows single-input pass-through ops (`Cast`, `Identity`, `Reshape`, …) backward.
    pub fn skip_back(&self, mut value: &'g str, ops: &[&str]) -> &'g str {
        while let Some((id, op)) = self.producer(value) {
            if !ops.contains(&op) {
                break;
            }
            value = self.input(id, 0);
        }
        value
    }
}

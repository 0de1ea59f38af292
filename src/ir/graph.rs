//! The graph IR: an arena of nodes over one ONNX graph, with use-def maps kept by the API.
//!
//! Everything the IR does not model (graph name, doc string, inputs/outputs, value_info,
//! sparse initializers, quantization annotations, metadata, subgraph attributes) is kept
//! verbatim in the header proto, so a graph converted in and out unchanged re-encodes to
//! the same bytes. Mutation happens only through [`Patch`](super::Patch).
use crate::error::{Error, Result};
use crate::onnx::proto::{AttributeProto, GraphProto, NodeProto, TensorProto, ValueInfoProto};
use bytes::Bytes;
use indexmap::IndexMap;
use std::collections::{HashMap, HashSet};

/// Index of a node in the graph's arena. Stable for the node's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) u32);

impl NodeId {
    /// The arena index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A graph initializer: its proto (which may reference external data) and, when the
/// data is external, a zero-copy view of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Initializer {
    /// The tensor as written in the model.
    pub proto: TensorProto,
    /// The resolved external bytes, when `proto` stores its data externally.
    pub external: Option<Bytes>,
}

impl Initializer {
    /// An inline initializer.
    pub fn inline(proto: TensorProto) -> Self {
        Initializer {
            proto,
            external: None,
        }
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        self.proto.name.as_deref().unwrap_or("")
    }

    /// The tensor's raw little-endian bytes, wherever they are stored.
    pub fn bytes(&self) -> Result<Bytes> {
        match &self.external {
            Some(b) => Ok(b.clone()),
            None => crate::onnx::tensor::inline_bytes(&self.proto),
        }
    }
}

/// Sorted (producer, consumers) lists of a graph, see [`Graph::maps_snapshot`].
pub type MapsSnapshot = (Vec<(String, NodeId)>, Vec<(String, Vec<NodeId>)>);

/// One ONNX graph as an arena of nodes plus initializers, with use-def maps.
#[derive(Debug, Clone)]
pub struct Graph {
    pub(crate) header: GraphProto,
    pub(crate) nodes: Vec<Option<NodeProto>>,
    pub(crate) order: Vec<NodeId>,
    pub(crate) inits: IndexMap<String, Initializer>,
    producer: HashMap<String, NodeId>,
    consumers: HashMap<String, Vec<NodeId>>,
}

impl Graph {
    /// Builds the IR from a graph proto. `external` gives the resolved bytes of
    /// initializers stored externally (by name).
    pub fn from_proto(mut g: GraphProto, mut external: HashMap<String, Bytes>) -> Result<Graph> {
        let nodes: Vec<Option<NodeProto>> =
            std::mem::take(&mut g.node).into_iter().map(Some).collect();
        let order = (0..nodes.len() as u32).map(NodeId).collect();
        let mut inits = IndexMap::new();
        for t in std::mem::take(&mut g.initializer) {
            let name = t.name.clone().unwrap_or_default();
            if name.is_empty() {
                return Err(Error::Graph {
                    node: None,
                    reason: "an initializer has no name".into(),
                });
            }
            let ext = external.remove(&name);
            if inits
                .insert(
                    name.clone(),
                    Initializer {
                        proto: t,
                        external: ext,
                    },
                )
                .is_some()
            {
                return Err(Error::Graph {
                    node: None,
                    reason: format!("initializer '{name}' is defined twice"),
                });
            }
        }
        let mut graph = Graph {
            header: g,
            nodes,
            order,
            inits,
            producer: HashMap::new(),
            consumers: HashMap::new(),
        };
        graph.rebuild_maps();
        Ok(graph)
    }

    /// The graph proto, nodes in topological order, initializers in insertion order.
    pub fn to_proto(&self) -> GraphProto {
        let mut g = self.header.clone();
        g.node = self.nodes().map(|(_, n)| n.clone()).collect();
        g.initializer = self.inits.values().map(|i| i.proto.clone()).collect();
        g
    }

    /// The graph's name.
    pub fn name(&self) -> &str {
        self.header.name.as_deref().unwrap_or("")
    }

    /// Graph inputs (may include initializer names in old IR versions).
    pub fn inputs(&self) -> &[ValueInfoProto] {
        &self.header.input
    }

    /// Graph inputs the caller must feed (initializers listed as inputs excluded).
    pub fn data_inputs(&self) -> impl Iterator<Item = &ValueInfoProto> + '_ {
        self.header
            .input
            .iter()
            .filter(|v| self.initializer(v.name.as_deref().unwrap_or("")).is_none())
    }

    /// Graph outputs.
    pub fn outputs(&self) -> &[ValueInfoProto] {
        &self.header.output
    }

    /// Intermediate value infos recorded by the exporter.
    pub fn value_info(&self) -> &[ValueInfoProto] {
        &self.header.value_info
    }

    /// Nodes in topological order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &NodeProto)> + '_ {
        self.order
            .iter()
            .filter_map(|&id| self.nodes[id.index()].as_ref().map(|n| (id, n)))
    }

    /// Number of live nodes.
    pub fn node_count(&self) -> usize {
        self.order.len()
    }

    /// The node with this id, if it is live.
    pub fn node(&self, id: NodeId) -> Option<&NodeProto> {
        self.nodes.get(id.index()).and_then(|n| n.as_ref())
    }

    /// The node producing `value`, if a node does.
    pub fn producer(&self, value: &str) -> Option<NodeId> {
        self.producer.get(value).copied()
    }

    /// Nodes that read `value` (directly or from a subgraph), in topological order.
    pub fn consumers(&self, value: &str) -> &[NodeId] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The initializer called `name`.
    pub fn initializer(&self, name: &str) -> Option<&Initializer> {
        self.inits.get(name)
    }

    /// All initializers in file order.
    pub fn initializers(&self) -> impl Iterator<Item = &Initializer> + '_ {
        self.inits.values()
    }

    /// Whether `name` is a graph input.
    pub fn is_input(&self, name: &str) -> bool {
        self.header
            .input
            .iter()
            .any(|v| v.name.as_deref() == Some(name))
    }

    /// Whether `name` is a graph output.
    pub fn is_output(&self, name: &str) -> bool {
        self.header
            .output
            .iter()
            .any(|v| v.name.as_deref() == Some(name))
    }

    /// Values a node reads: its inputs plus outer-scope values its subgraphs capture.
    pub fn node_uses(node: &NodeProto) -> Vec<String> {
        let mut uses: Vec<String> = node
            .input
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        for a in &node.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                for c in captures(g) {
                    if !uses.contains(&c) {
                        uses.push(c);
                    }
                }
            }
        }
        uses
    }

    pub(crate) fn rebuild_maps(&mut self) {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<NodeId>> = HashMap::new();
        for &id in &self.order {
            let Some(n) = self.nodes[id.index()].as_ref() else {
                continue;
            };
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                producer.entry(o.clone()).or_insert(id);
            }
            for u in Self::node_uses(n) {
                let v = consumers.entry(u).or_default();
                if v.last() != Some(&id) {
                    v.push(id);
                }
            }
        }
        self.producer = producer;
        self.consumers = consumers;
    }

    /// The use-def maps as sorted lists (for tests of the incremental API).
    #[doc(hidden)]
    pub fn maps_snapshot(&self) -> MapsSnapshot {
        let mut p: Vec<_> = self.producer.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let mut c: Vec<_> = self
            .consumers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        p.sort();
        c.sort();
        (p, c)
    }

    /// Checks the graph's invariants: every input defined before use, nodes in
    /// topological order, each value defined once, unique node names, every graph
    /// output produced.
    pub fn verify(&self) -> Result<()> {
        let err = |node: Option<&NodeProto>, reason: String| Error::Graph {
            node: node.map(node_label),
            reason,
        };
        let mut defined: HashSet<&str> = HashSet::new();
        for v in &self.header.input {
            let n = v.name.as_deref().unwrap_or("");
            if !defined.insert(n) {
                return Err(err(None, format!("graph input '{n}' is declared twice")));
            }
        }
        for name in self.inits.keys() {
            defined.insert(name.as_str());
        }
        for s in &self.header.sparse_initializer {
            if let Some(n) = s.values.as_ref().and_then(|v| v.name.as_deref()) {
                defined.insert(n);
            }
        }
        let mut node_names: HashSet<&str> = HashSet::new();
        for (_, n) in self.nodes() {
            for u in Self::node_uses(n) {
                if !defined.contains(u.as_str()) {
                    return Err(err(
                        Some(n),
                        format!("input '{u}' is not defined before this node"),
                    ));
                }
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if !defined.insert(o.as_str()) {
                    return Err(err(
                        Some(n),
                        format!("value '{o}' is defined more than once"),
                    ));
                }
            }
            if let Some(name) = n.name.as_deref().filter(|s| !s.is_empty()) {
                if !node_names.insert(name) {
                    return Err(err(Some(n), format!("node name '{name}' is used twice")));
                }
            }
        }
        for v in &self.header.output {
            let n = v.name.as_deref().unwrap_or("");
            if !defined.contains(n) {
                return Err(err(None, format!("graph output '{n}' is never produced")));
            }
        }
        Ok(())
    }
}

/// `name (op_type)` of a node, for messages.
pub fn node_label(n: &NodeProto) -> String {
    let name = n
        .name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("<unnamed>");
    format!("{name} ({})", n.op_type.as_deref().unwrap_or("?"))
}

/// A node's attribute by name.
pub fn node_attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

/// Outer-scope values a subgraph reads (recursively through nested subgraphs).
fn captures(g: &GraphProto) -> Vec<String> {
    let mut local: HashSet<&str> = HashSet::new();
    local.extend(g.input.iter().filter_map(|v| v.name.as_deref()));
    local.extend(g.initializer.iter().filter_map(|t| t.name.as_deref()));
    local.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().and_then(|v| v.name.as_deref())),
    );
    let mut out: Vec<String> = Vec::new();
    for n in &g.node {
        for u in Graph::node_uses(n) {
            if !local.contains(u.as_str()) && !out.contains(&u) {
                out.push(u);
            }
        }
        local.extend(n.output.iter().map(String::as_str));
    }
    for v in &g.output {
        if let Some(n) = v.name.as_deref() {
            if !local.contains(n) && !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
    }
    out
}

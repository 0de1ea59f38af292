//! Patches: the only way to change a [`Graph`].
//!
//! A pass never edits the graph; it describes a change (nodes to remove and add,
//! initializers to remove and add, uses to redirect) and [`Graph::apply`] applies it
//! atomically: the result is re-sorted topologically and verified, and on any error the
//! graph is left exactly as it was. A removed node's outputs may be produced again by
//! an added node (this is how a block is replaced while keeping graph output names).
use super::graph::{node_label, Graph, Initializer, NodeId};
use crate::error::{Error, Result};
use crate::onnx::proto::NodeProto;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

/// A labelled, atomic change to a graph.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// Who made the patch (pass name); appears in errors.
    pub label: String,
    remove_nodes: BTreeSet<NodeId>,
    add_nodes: Vec<NodeProto>,
    remove_inits: Vec<String>,
    add_inits: Vec<Initializer>,
    replace_uses: Vec<(String, String)>,
    add_outputs: Vec<String>,
    retain_outputs: Option<Vec<String>>,
}

impl Patch {
    /// An empty patch labelled `label`.
    pub fn new(label: impl Into<String>) -> Self {
        Patch {
            label: label.into(),
            ..Default::default()
        }
    }

    /// Removes a node.
    pub fn remove_node(&mut self, id: NodeId) -> &mut Self {
        self.remove_nodes.insert(id);
        self
    }

    /// Adds a node (placed topologically when applied).
    pub fn add_node(&mut self, node: NodeProto) -> &mut Self {
        self.add_nodes.push(node);
        self
    }

    /// Removes an initializer.
    pub fn remove_initializer(&mut self, name: impl Into<String>) -> &mut Self {
        self.remove_inits.push(name.into());
        self
    }

    /// Adds an initializer.
    pub fn add_initializer(&mut self, init: Initializer) -> &mut Self {
        self.add_inits.push(init);
        self
    }

    /// Makes every node that reads `old` read `new` instead (graph outputs are not
    /// renamed: produce the output's own name from an added node instead).
    pub fn replace_uses(&mut self, old: impl Into<String>, new: impl Into<String>) -> &mut Self {
        self.replace_uses.push((old.into(), new.into()));
        self
    }

    /// Exposes an existing value as an extra graph output (type left for runtimes to infer).
    pub fn add_output(&mut self, name: impl Into<String>) -> &mut Self {
        self.add_outputs.push(name.into());
        self
    }

    /// Keeps only these of the graph's outputs (before [`Patch::add_output`]'s are added);
    /// the nodes then computing nothing an output needs are dead code (see
    /// [`crate::ir::prune`]).
    pub fn retain_outputs(&mut self, names: impl IntoIterator<Item = String>) -> &mut Self {
        self.retain_outputs = Some(names.into_iter().collect());
        self
    }

    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.remove_nodes.is_empty()
            && self.add_nodes.is_empty()
            && self.remove_inits.is_empty()
            && self.add_inits.is_empty()
            && self.replace_uses.is_empty()
            && self.add_outputs.is_empty()
            && self.retain_outputs.is_none()
    }
}

impl Graph {
    /// Applies `patch` atomically: on error the graph is unchanged.
    pub fn apply(&mut self, patch: Patch) -> Result<()> {
        let label = patch.label.clone();
        let rejected = |reason: String| Error::Patch {
            label: label.clone(),
            reason,
        };
        let mut g = self.clone();
        for &id in &patch.remove_nodes {
            if g.node(id).is_none() {
                return Err(rejected(format!("node #{} does not exist", id.index())));
            }
            g.nodes[id.index()] = None;
        }
        g.order.retain(|id| !patch.remove_nodes.contains(id));
        for name in &patch.remove_inits {
            if g.inits.shift_remove(name).is_none() {
                return Err(rejected(format!("initializer '{name}' does not exist")));
            }
        }
        for init in patch.add_inits {
            let name = init.name().to_string();
            if name.is_empty() {
                return Err(rejected("an added initializer has no name".into()));
            }
            if g.inits.contains_key(&name) {
                return Err(rejected(format!("initializer '{name}' already exists")));
            }
            g.inits.insert(name, init);
        }
        for n in patch.add_nodes {
            let id = NodeId(g.nodes.len() as u32);
            g.nodes.push(Some(n));
            g.order.push(id);
        }
        if !patch.replace_uses.is_empty() {
            let map: HashMap<&str, &str> = patch
                .replace_uses
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            for (old, _) in &patch.replace_uses {
                if g.is_output(old) {
                    return Err(rejected(format!(
                        "'{old}' is a graph output; produce it from an added node instead of renaming it"
                    )));
                }
            }
            for &id in &g.order {
                if let Some(n) = g.nodes[id.index()].as_mut() {
                    for i in n.input.iter_mut() {
                        if let Some(new) = map.get(i.as_str()) {
                            *i = new.to_string();
                        }
                    }
                }
            }
        }
        if let Some(keep) = &patch.retain_outputs {
            g.header
                .output
                .retain(|o| o.name.as_ref().is_some_and(|n| keep.contains(n)));
        }
        for name in &patch.add_outputs {
            if !g.is_output(name) {
                g.header.output.push(crate::onnx::proto::ValueInfoProto {
                    name: Some(name.clone()),
                    ..Default::default()
                });
            }
        }
        g.toposort().map_err(|e| rejected(e.to_string()))?;
        g.rebuild_maps();
        g.verify().map_err(|e| rejected(e.to_string()))?;
        *self = g;
        Ok(())
    }

    /// Re-sorts nodes topologically, keeping the current relative order wherever the
    /// dependencies allow (stable Kahn's algorithm).
    fn toposort(&mut self) -> Result<()> {
        let pos: HashMap<NodeId, usize> = self
            .order
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i))
            .collect();
        let mut producer: HashMap<&str, NodeId> = HashMap::new();
        for &id in &self.order {
            let n = self.nodes[id.index()].as_ref().expect("live node");
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if producer.insert(o.as_str(), id).is_some() {
                    return Err(Error::Graph {
                        node: Some(node_label(n)),
                        reason: format!("value '{o}' is defined more than once"),
                    });
                }
            }
        }
        let mut indeg: HashMap<NodeId, usize> = HashMap::new();
        let mut users: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
        for &id in &self.order {
            let n = self.nodes[id.index()].as_ref().expect("live node");
            let deps: HashSet<NodeId> = Graph::node_uses(n)
                .iter()
                .filter_map(|u| producer.get(u.as_str()).copied())
                .filter(|&p| p != id)
                .collect();
            indeg.insert(id, deps.len());
            for d in deps {
                users.entry(d).or_default().push(id);
            }
        }
        let mut ready: BinaryHeap<Reverse<(usize, NodeId)>> = self
            .order
            .iter()
            .filter(|id| indeg[id] == 0)
            .map(|&id| Reverse((pos[&id], id)))
            .collect();
        let mut out = Vec::with_capacity(self.order.len());
        while let Some(Reverse((_, id))) = ready.pop() {
            out.push(id);
            for &u in users.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
                let d = indeg.get_mut(&u).expect("known node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse((pos[&u], u)));
                }
            }
        }
        if out.len() != self.order.len() {
            return Err(Error::Graph {
                node: None,
                reason: "the graph has a cycle".into(),
            });
        }
        self.order = out;
        Ok(())
    }
}

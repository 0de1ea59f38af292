//! Graph segments: the model cut at its MoE blocks into self-contained models that run one
//! after another.
//!
//! Segment `i` holds every node the output of block `i` depends on that no earlier segment
//! holds, plus the block's own nodes; the nodes no block output depends on (final norm, head,
//! side outputs) form a last segment. Since a node's ancestors are always in its segment or
//! an earlier one, running the segments in order computes exactly what the whole model does.
//! A segment's inputs are the model inputs it reads and the tensors of earlier segments it
//! reads (the residual stream, but also masks, position ids, rotary tables and shape values);
//! its outputs are what later segments read plus the model outputs it computes. Its weights
//! are the original's initializers, still memory-mapped from the original file.
//!
//! Values computed from the model inputs and scalar or vector constants alone (shape
//! arithmetic, masks, position tables; never a weight matrix), by at most [`RECOMPUTE_LIMIT`] nodes, do not cross a cut: each segment
//! that reads one recomputes it. Runtimes need shape values they can trace to the model's
//! inputs (tract refuses a `Reshape` whose shape is a model input), and nothing is cached.
//!
//! Tensors cross a cut as float32 or int64 (the runtimes' common ground): a crossing tensor
//! of another type (bool masks, int32 lengths, float16 activations) is cast on the way out
//! and cast back on the way in, which is exact for every type allowed to cross.
use crate::error::{Error, Result};
use crate::ir::{builder, node_label, types, Graph, NodeId, Patch};
use crate::model::Model;
use crate::moe::Detection;
use crate::onnx::proto::{
    tensor_proto::DataType, type_proto, GraphProto, NodeProto, ValueInfoProto,
};
use std::collections::{HashMap, HashSet};

mod cache;
pub(crate) mod flow;
pub use cache::{free_bytes, peak_bytes};

/// A tensor entering or leaving a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The value's name in the original graph.
    pub name: String,
    /// The name it has at the segment's boundary (equal to `name` unless it crosses cast).
    pub wire: String,
    /// Its element type in the original graph (ONNX code).
    pub elem: i32,
}

/// One segment: a self-contained model.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The detected block that ends this segment (`None` for the tail after the last block).
    pub block: Option<String>,
    /// The segment as a model.
    pub model: Model,
    /// What it reads, in input order: model inputs and crossing tensors.
    pub inputs: Vec<Port>,
    /// What it writes, in output order: crossing tensors and model outputs.
    pub outputs: Vec<Port>,
    /// How many of the original graph's nodes it holds (each node is in exactly one segment).
    pub nodes: usize,
    /// How many nodes of earlier segments it recomputes instead of reading their outputs.
    pub recomputed: usize,
}

/// A model cut into segments.
#[derive(Debug, Clone)]
pub struct Segmentation {
    /// The segments in execution order.
    pub segments: Vec<Segment>,
    /// Every tensor that crosses a cut (each once), in the order it is produced.
    pub crossing: Vec<Port>,
}

/// Cuts `model` at the blocks of `det`.
pub fn cut(model: &Model, det: &Detection) -> Result<Segmentation> {
    let g = &model.graph;
    let order: Vec<(NodeId, &NodeProto)> = g.nodes().collect();
    let pos: HashMap<NodeId, usize> = order
        .iter()
        .enumerate()
        .map(|(k, (id, _))| (*id, k))
        .collect();
    let seg = assign(g, det, &order, &pos)?;
    let types = types::elem_types(g);
    let count = seg.iter().copied().max().map_or(0, |m| m + 1);

    // Where each value is produced (segment), and which values cross a cut.
    let mut made_in: HashMap<&str, usize> = HashMap::new();
    for (k, (_, n)) in order.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            made_in.insert(o.as_str(), seg[k]);
        }
    }
    let cheap = recomputable(g, &order, &pos);
    let mut recompute: Vec<HashSet<usize>> = vec![HashSet::new(); count];
    let mut crossing: Vec<Port> = Vec::new();
    let mut wire_of: HashMap<String, String> = HashMap::new();
    let mut taken: HashSet<String> = names(g);
    for (k, (_, n)) in order.iter().enumerate() {
        for u in Graph::node_uses(n) {
            let Some(&from) = made_in.get(u.as_str()) else {
                continue;
            };
            if from >= seg[k] {
                continue;
            }
            let at = g.producer(&u).and_then(|id| pos.get(&id)).copied();
            if let Some(p) = at.filter(|&p| cheap[p]) {
                cone(g, &order, &pos, p, &mut recompute[seg[k]]);
                continue;
            }
            if wire_of.contains_key(&u) {
                continue;
            }
            let producer = g.producer(&u).and_then(|id| g.node(id)).map(node_label);
            let elem = *types.get(&u).ok_or_else(|| Error::Graph {
                node: producer.clone(),
                reason: format!(
                    "cannot tell the element type of '{u}', a tensor that crosses a segment cut"
                ),
            })?;
            let wire = match carrier(elem) {
                Some(c) if c == elem => u.clone(),
                Some(c) => unique(&mut taken, &format!("{u}.{}", suffix(c))),
                None => {
                    return Err(Error::Graph {
                        node: producer,
                        reason: format!(
                            "'{u}' crosses a segment cut as {}, which cannot be carried \
                             exactly as float32 or int64",
                            crate::onnx::dtype::name(elem)
                        ),
                    })
                }
            };
            wire_of.insert(u.clone(), wire.clone());
            crossing.push(Port {
                name: u,
                wire,
                elem,
            });
        }
    }
    // Crossing tensors in production order.
    crossing.sort_by_key(|p| {
        g.producer(&p.name)
            .and_then(|id| pos.get(&id))
            .copied()
            .unwrap_or(0)
    });

    let mut segments = Vec::new();
    for (s, again) in recompute.iter().enumerate() {
        let own = (0..order.len()).filter(|&k| seg[k] == s).count();
        if own == 0 {
            continue;
        }
        // Recomputed nodes depend on nothing of this segment: merged in original order, the
        // node list stays topological.
        let members: Vec<usize> = (0..order.len())
            .filter(|&k| seg[k] == s || again.contains(&k))
            .collect();
        let block = det.blocks.get(s).map(|b| b.name.clone());
        let mut segment = build(
            model, &order, &pos, &members, s, &seg, &made_in, &crossing, block,
        )?;
        segment.nodes = own;
        segment.recomputed = members.len() - own;
        segments.push(segment);
    }
    Ok(Segmentation { segments, crossing })
}

impl Segmentation {
    /// `model` (the one that was cut) with every crossing tensor exposed as an output under
    /// its wire name: one run of it gives every segment's inputs and expected outputs.
    pub fn instrumented(&self, model: &Model) -> Result<Model> {
        let mut m = model.clone();
        let mut p = Patch::new("expose the segment cuts");
        for c in &self.crossing {
            if c.wire != c.name {
                p.add_node(cast(&c.name, &c.wire, carrier(c.elem).unwrap_or(c.elem)));
            }
            p.add_output(c.wire.clone());
        }
        m.graph.apply(p)?;
        Ok(m)
    }
}

/// The segment of every node (by position in topological order): the first block whose
/// output depends on it, or whose region holds it; the tail (one past the last block) for
/// the rest; then raised to its inputs' segments so that no edge runs backwards.
fn assign(
    g: &Graph,
    det: &Detection,
    order: &[(NodeId, &NodeProto)],
    pos: &HashMap<NodeId, usize>,
) -> Result<Vec<usize>> {
    let mut seg = vec![usize::MAX; order.len()];
    for (i, b) in det.blocks.iter().enumerate() {
        let out = g.producer(&b.output).ok_or_else(|| Error::Graph {
            node: Some(b.name.clone()),
            reason: format!("the block's output '{}' has no producer", b.output),
        })?;
        let mut stack: Vec<NodeId> = b.nodes.clone();
        stack.push(out);
        while let Some(id) = stack.pop() {
            let Some(&k) = pos.get(&id) else { continue };
            if seg[k] != usize::MAX {
                continue;
            }
            seg[k] = i;
            if let Some(n) = g.node(id) {
                stack.extend(Graph::node_uses(n).iter().filter_map(|u| g.producer(u)));
            }
        }
    }
    let tail = det.blocks.len();
    for (k, (_, n)) in order.iter().enumerate() {
        if seg[k] == usize::MAX {
            seg[k] = tail;
        }
        for u in Graph::node_uses(n) {
            if let Some(p) = g.producer(&u).and_then(|id| pos.get(&id)) {
                seg[k] = seg[k].max(seg[*p]);
            }
        }
    }
    Ok(seg)
}

/// Builds segment `s` from the nodes at positions `members`.
#[allow(clippy::too_many_arguments)]
fn build(
    model: &Model,
    order: &[(NodeId, &NodeProto)],
    pos: &HashMap<NodeId, usize>,
    members: &[usize],
    s: usize,
    seg: &[usize],
    made_in: &HashMap<&str, usize>,
    crossing: &[Port],
    block: Option<String>,
) -> Result<Segment> {
    let g = &model.graph;
    let by_name: HashMap<&str, &Port> = crossing.iter().map(|p| (p.name.as_str(), p)).collect();
    let produced: HashSet<&str> = members
        .iter()
        .flat_map(|&k| order[k].1.output.iter())
        .filter(|o| !o.is_empty())
        .map(String::as_str)
        .collect();
    let data_inputs: HashMap<&str, &ValueInfoProto> = g
        .data_inputs()
        .filter_map(|v| Some((v.name.as_deref()?, v)))
        .collect();

    let mut inputs: Vec<Port> = Vec::new();
    let mut input_vi: Vec<ValueInfoProto> = Vec::new();
    let mut front: Vec<NodeProto> = Vec::new();
    let mut inits: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for &k in members {
        let n = order[k].1;
        for u in Graph::node_uses(n) {
            if produced.contains(u.as_str()) || !seen.insert(u.clone()) {
                continue;
            }
            if let Some(vi) = data_inputs.get(u.as_str()) {
                inputs.push(Port {
                    name: u.clone(),
                    wire: u.clone(),
                    elem: types::declared(vi).unwrap_or(0),
                });
                input_vi.push((*vi).clone());
            } else if g.initializer(&u).is_some() {
                inits.push(u);
            } else if let Some(p) = by_name.get(u.as_str()) {
                let carried = carrier(p.elem).unwrap_or(p.elem);
                input_vi.push(any_shape(&p.wire, carried));
                if p.wire != p.name {
                    front.push(cast(&p.wire, &p.name, p.elem));
                }
                inputs.push((*p).clone());
            } else {
                return Err(Error::Graph {
                    node: Some(node_label(n)),
                    reason: format!("reads '{u}', which no node, input or initializer defines"),
                });
            }
        }
    }
    // Model inputs keep the model's declarations; crossing tensors are declared by type only.
    let mut outputs: Vec<Port> = Vec::new();
    let mut output_vi: Vec<ValueInfoProto> = Vec::new();
    let mut back: Vec<NodeProto> = Vec::new();
    for &k in members {
        if seg[k] != s {
            continue;
        }
        for o in order[k].1.output.iter().filter(|o| !o.is_empty()) {
            if let Some(vi) = g.outputs().iter().find(|v| v.name.as_deref() == Some(o)) {
                outputs.push(Port {
                    name: o.clone(),
                    wire: o.clone(),
                    elem: types::declared(vi).unwrap_or(0),
                });
                output_vi.push(vi.clone());
            }
            let Some(p) = by_name.get(o.as_str()) else {
                continue;
            };
            if made_in.get(o.as_str()) != Some(&s) || outputs.iter().any(|q| q.wire == p.wire) {
                continue;
            }
            let later = g
                .consumers(o)
                .iter()
                .any(|c| pos.get(c).is_some_and(|&q| seg[q] > s));
            if !later {
                continue;
            }
            let carried = carrier(p.elem).unwrap_or(p.elem);
            output_vi.push(any_shape(&p.wire, carried));
            if p.wire != p.name {
                back.push(cast(&p.name, &p.wire, carried));
            }
            outputs.push((*p).clone());
        }
    }

    let mut header: GraphProto = g.header.clone();
    header.name = Some(format!("{}_segment{s}", g.name()));
    header.input = input_vi;
    header.output = output_vi;
    header
        .value_info
        .retain(|v| v.name.as_deref().is_some_and(|n| produced.contains(n)));
    header.node = front
        .into_iter()
        .chain(members.iter().map(|&k| order[k].1.clone()))
        .chain(back)
        .collect();
    let mut external = HashMap::new();
    header.initializer = g
        .initializers()
        .filter(|i| inits.iter().any(|n| n == i.name()))
        .map(|i| {
            if let Some(b) = &i.external {
                external.insert(i.name().to_string(), b.clone());
            }
            i.proto.clone()
        })
        .collect();
    let graph = Graph::from_proto(header, external)?;
    graph.verify()?;
    Ok(Segment {
        block,
        model: model.with_graph(graph),
        inputs,
        outputs,
        nodes: members.len(),
        recomputed: 0,
    })
}

/// The type a tensor of type `elem` crosses a cut as: itself for float32/int64, float32 for
/// the narrower floats, int64 for bool and the narrower integers; `None` when no carrier is
/// exact.
fn carrier(elem: i32) -> Option<i32> {
    use DataType as D;
    let d = DataType::try_from(elem).ok()?;
    match d {
        D::Float | D::Float16 | D::Bfloat16 => Some(D::Float as i32),
        D::Int64 | D::Int32 | D::Int16 | D::Int8 | D::Uint32 | D::Uint16 | D::Uint8 | D::Bool => {
            Some(D::Int64 as i32)
        }
        _ => None,
    }
}

fn suffix(carried: i32) -> &'static str {
    if carried == DataType::Float as i32 {
        "f32"
    } else {
        "i64"
    }
}

fn datatype(elem: i32) -> DataType {
    DataType::try_from(elem).unwrap_or(DataType::Undefined)
}

fn cast(from: &str, to: &str, elem: i32) -> NodeProto {
    builder::node(
        "Cast",
        &format!("{to}/segment_cast"),
        &[from],
        &[to],
        vec![builder::attr_int("to", elem as i64)],
    )
}

/// A value info with element type `elem` and no shape (any rank).
fn any_shape(name: &str, elem: i32) -> ValueInfoProto {
    let mut v = builder::value_info(name, datatype(elem), &[]);
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape = None;
    }
    v
}

/// Every name the graph defines or reads.
fn names(g: &Graph) -> HashSet<String> {
    let mut v: HashSet<String> = g.initializers().map(|i| i.name().to_string()).collect();
    v.extend(g.inputs().iter().filter_map(|i| i.name.clone()));
    for (_, n) in g.nodes() {
        v.extend(n.output.iter().cloned());
        v.extend(Graph::node_uses(n));
    }
    v
}

/// `base`, or `base_2`, `base_3`, … when taken; marks the result taken.
fn unique(taken: &mut HashSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 2;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

/// The most nodes a segment recomputes for one value instead of reading it across a cut.
pub const RECOMPUTE_LIMIT: usize = 64;

/// Per position: whether the node computes from model inputs, vector or scalar initializers
/// and constants only, through at most [`RECOMPUTE_LIMIT`] nodes, none with a subgraph. A
/// matrix (a weight, an embedding table) marks the data path, which is never recomputed.
fn recomputable(
    g: &Graph,
    order: &[(NodeId, &NodeProto)],
    pos: &HashMap<NodeId, usize>,
) -> Vec<bool> {
    let data: HashSet<&str> = g.data_inputs().filter_map(|v| v.name.as_deref()).collect();
    let mut ok = vec![false; order.len()];
    let mut size = vec![0usize; order.len()];
    for (k, (_, n)) in order.iter().enumerate() {
        if n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            continue;
        }
        if n.op_type.as_deref() == Some("Constant") && n.attribute.iter().any(matrix_value) {
            continue;
        }
        let mut total = 1;
        let mut fine = true;
        for u in n.input.iter().filter(|u| !u.is_empty()) {
            if let Some(i) = g.initializer(u) {
                // Weights (matrices, embeddings) mark the data path, never recomputed; a
                // vector with unit axes (`inv_freq[None, :, None]`) is still a vector.
                if is_matrix(&i.proto.dims) {
                    fine = false;
                    break;
                }
                continue;
            }
            if data.contains(u.as_str()) {
                continue;
            }
            match g.producer(u).and_then(|id| pos.get(&id)) {
                Some(&p) if ok[p] => total += size[p],
                _ => {
                    fine = false;
                    break;
                }
            }
        }
        if fine && total <= RECOMPUTE_LIMIT {
            ok[k] = true;
            size[k] = total;
        }
    }
    ok
}

/// Whether a `Constant` attribute holds a matrix (a weight baked into the graph).
fn matrix_value(a: &crate::onnx::proto::AttributeProto) -> bool {
    a.t.as_ref().is_some_and(|t| is_matrix(&t.dims))
}

/// Whether a tensor of these dims is a matrix: at least two axes longer than one.
fn is_matrix(dims: &[i64]) -> bool {
    dims.iter().filter(|&&d| d != 1).count() >= 2
}

/// Adds position `at` and its recomputable ancestors to `into`.
fn cone(
    g: &Graph,
    order: &[(NodeId, &NodeProto)],
    pos: &HashMap<NodeId, usize>,
    at: usize,
    into: &mut HashSet<usize>,
) {
    let mut stack = vec![at];
    while let Some(k) = stack.pop() {
        if !into.insert(k) {
            continue;
        }
        for u in order[k].1.input.iter().filter(|u| !u.is_empty()) {
            if let Some(&p) = g.producer(u).and_then(|id| pos.get(&id)) {
                stack.push(p);
            }
        }
    }
}

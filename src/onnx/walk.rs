//! Visits every tensor stored anywhere in a model: initializers, sparse initializers,
//! node attributes, subgraphs, functions and training graphs.
use super::proto::{AttributeProto, GraphProto, NodeProto, SparseTensorProto, TensorProto};
use crate::error::Result;

/// Calls `f` on every tensor inside `nodes` (attributes and subgraphs, recursively).
pub fn nodes_tensors_mut(
    nodes: &mut [NodeProto],
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for n in nodes {
        for a in &mut n.attribute {
            attribute_tensors_mut(a, f)?;
        }
    }
    Ok(())
}

/// Calls `f` on every tensor of a graph, including nested subgraphs.
pub fn graph_tensors_mut(
    g: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        sparse_mut(s, f)?;
    }
    nodes_tensors_mut(&mut g.node, f)
}

fn sparse_mut(
    s: &mut SparseTensorProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    if let Some(v) = s.values.as_mut() {
        f(v)?;
    }
    if let Some(i) = s.indices.as_mut() {
        f(i)?;
    }
    Ok(())
}

fn attribute_tensors_mut(
    a: &mut AttributeProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    if let Some(t) = a.t.as_mut() {
        f(t)?;
    }
    for t in &mut a.tensors {
        f(t)?;
    }
    if let Some(s) = a.sparse_tensor.as_mut() {
        sparse_mut(s, f)?;
    }
    for s in &mut a.sparse_tensors {
        sparse_mut(s, f)?;
    }
    if let Some(g) = a.g.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for g in &mut a.graphs {
        graph_tensors_mut(g, f)?;
    }
    Ok(())
}

/// Calls `f` on every tensor of a model: main graph, functions, training graphs.
pub fn model_tensors_mut(
    proto: &mut super::proto::ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    if let Some(g) = proto.graph.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for func in &mut proto.functions {
        nodes_tensors_mut(&mut func.node, f)?;
    }
    for ti in &mut proto.training_info {
        for g in [ti.initialization.as_mut(), ti.algorithm.as_mut()]
            .into_iter()
            .flatten()
        {
            graph_tensors_mut(g, f)?;
        }
    }
    Ok(())
}

//! Building replacement subgraphs: fresh names, nodes, constants and weights.
use crate::ir::builder::{attr_ints, node, tensor_float, tensor_i64};
use crate::ir::{Graph, Initializer};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::{AttributeProto, NodeProto};
use std::collections::HashSet;

/// Collects the nodes and initializers of one replacement, with names that cannot clash
/// with the graph's (one deterministic counter per emitter).
pub struct Emitter<'g> {
    g: &'g Graph,
    prefix: String,
    counter: usize,
    taken: HashSet<String>,
    /// Default-domain opset the nodes must satisfy.
    pub opset: i64,
    /// Nodes, in emission order.
    pub nodes: Vec<NodeProto>,
    /// New initializers.
    pub inits: Vec<Initializer>,
    /// Initializers already written for a layer's shared bases, by base index.
    pub bases: std::collections::BTreeMap<usize, String>,
    /// Element type of the block's floating-point values (ONNX `DataType`): float, or the
    /// float16/bfloat16 of a half-precision model, in which the block is written and
    /// computes.
    pub float: i32,
}

impl<'g> Emitter<'g> {
    /// An emitter whose names start with `prefix`.
    pub fn new(g: &'g Graph, prefix: &str, opset: i64) -> Self {
        Emitter {
            g,
            prefix: prefix.to_string(),
            counter: 0,
            taken: HashSet::new(),
            opset,
            nodes: Vec::new(),
            inits: Vec::new(),
            bases: Default::default(),
            float: DataType::Float as i32,
        }
    }

    /// The graph being rewritten.
    pub fn graph(&self) -> &'g Graph {
        self.g
    }

    /// A fresh value name.
    pub fn fresh(&mut self, hint: &str) -> String {
        loop {
            let name = format!("{}/{hint}_{}", self.prefix, self.counter);
            self.counter += 1;
            if self.g.producer(&name).is_none()
                && self.g.initializer(&name).is_none()
                && self.taken.insert(name.clone())
            {
                return name;
            }
        }
    }

    /// Adds a node with one fresh output.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.op_into(op, inputs, &out, attrs);
        out
    }

    /// Adds a node writing a given output name.
    pub fn op_into(&mut self, op: &str, inputs: &[&str], out: &str, attrs: Vec<AttributeProto>) {
        let name = format!("{}/{op}_{}", self.prefix, self.nodes.len());
        self.nodes.push(node(op, &name, inputs, &[out], attrs));
    }

    /// Adds a node with several fresh outputs.
    pub fn op_multi(
        &mut self,
        op: &str,
        inputs: &[&str],
        n_out: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..n_out)
            .map(|i| self.fresh(&format!("{}{i}", op.to_ascii_lowercase())))
            .collect();
        let name = format!("{}/{op}_{}", self.prefix, self.nodes.len());
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.nodes.push(node(op, &name, inputs, &refs, attrs));
        outs
    }

    /// An int64 constant initializer.
    pub fn ints(&mut self, hint: &str, dims: &[i64], vals: &[i64]) -> String {
        let name = self.fresh(hint);
        self.inits
            .push(Initializer::inline(tensor_i64(&name, dims, vals)));
        name
    }

    /// A floating-point constant initializer in the block's element type ([`Self::float`]).
    pub fn floats(&mut self, hint: &str, dims: &[i64], vals: &[f32]) -> String {
        let name = self.fresh(hint);
        self.inits.push(Initializer::inline(tensor_float(
            &name, dims, vals, self.float,
        )));
        name
    }

    /// A floating-point constant initializer of element type `dtype`.
    pub fn floats_as(&mut self, hint: &str, dims: &[i64], vals: &[f32], dtype: i32) -> String {
        let name = self.fresh(hint);
        self.inits
            .push(Initializer::inline(tensor_float(&name, dims, vals, dtype)));
        name
    }

    /// A uint8 constant initializer.
    pub fn bytes(&mut self, hint: &str, dims: &[i64], vals: Vec<u8>) -> String {
        let name = self.fresh(hint);
        self.inits
            .push(Initializer::inline(crate::ir::builder::tensor_u8(
                &name, dims, vals,
            )));
        name
    }

    /// A tensor of `shape_of`'s shape filled with `value`, in the block's element type.
    pub fn filled_like(&mut self, shape_of: &str, value: f32) -> String {
        let shape = self.op("Shape", &[shape_of], vec![]);
        let v = tensor_float("", &[1], &[value], self.float);
        self.op(
            "ConstantOfShape",
            &[&shape],
            vec![crate::ir::builder::attr_tensor("value", v)],
        )
    }

    /// ReduceSum over `axes` (attribute before opset 13, input from 13).
    pub fn reduce_sum(&mut self, x: &str, axes: &[i64], keepdims: bool) -> String {
        let kd = crate::ir::builder::attr_int("keepdims", i64::from(keepdims));
        if self.opset >= 13 {
            let a = self.ints("axes", &[axes.len() as i64], axes);
            self.op("ReduceSum", &[x, &a], vec![kd])
        } else {
            self.op("ReduceSum", &[x], vec![attr_ints("axes", axes), kd])
        }
    }

    /// Any ONNX reduction (`ReduceSum`, `ReduceLogSumExp`, …) over `axes`: axes are an input
    /// from opset 13 for ReduceSum and from opset 18 for the others, an attribute before.
    pub fn reduce(&mut self, op: &str, x: &str, axes: &[i64], keepdims: bool) -> String {
        let from = if op == "ReduceSum" { 13 } else { 18 };
        let kd = crate::ir::builder::attr_int("keepdims", i64::from(keepdims));
        if self.opset >= from {
            let a = self.ints("axes", &[axes.len() as i64], axes);
            self.op(op, &[x, &a], vec![kd])
        } else {
            self.op(op, &[x], vec![attr_ints("axes", axes), kd])
        }
    }

    /// Unsqueeze at `axes`.
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        if self.opset >= 13 {
            let a = self.ints("axes", &[axes.len() as i64], axes);
            self.op("Unsqueeze", &[x, &a], vec![])
        } else {
            self.op("Unsqueeze", &[x], vec![attr_ints("axes", axes)])
        }
    }

    /// Reshape to a constant shape.
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.ints("shape", &[shape.len() as i64], shape);
        self.op("Reshape", &[x, &s], vec![])
    }
}

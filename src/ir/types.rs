//! Element types of a graph's values: declared where the graph declares them (inputs,
//! outputs, value_info, initializers), else propagated through the nodes by each operator's
//! typing rule. Segment extraction needs them to declare the tensors that cross a cut.
use super::{node_attr, Graph};
use crate::onnx::proto::{tensor_proto::DataType, type_proto, GraphProto, ValueInfoProto};
use std::collections::HashMap;

/// ONNX element type codes used by the rules.
const FLOAT: i32 = DataType::Float as i32;
const UINT8: i32 = DataType::Uint8 as i32;
const INT32: i32 = DataType::Int32 as i32;
const INT64: i32 = DataType::Int64 as i32;
const BOOL: i32 = DataType::Bool as i32;

/// The element type a value info declares, if any.
pub fn declared(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.elem_type.filter(|&e| e != 0),
        _ => None,
    }
}

/// Element types of every value of `g` whose type is declared or can be inferred, by name.
pub fn elem_types(g: &Graph) -> HashMap<String, i32> {
    let mut t: HashMap<String, i32> = HashMap::new();
    let header = &g.header;
    for v in header
        .input
        .iter()
        .chain(&header.output)
        .chain(&header.value_info)
    {
        if let (Some(name), Some(e)) = (v.name.as_ref(), declared(v)) {
            t.insert(name.clone(), e);
        }
    }
    for i in g.initializers() {
        if let Some(e) = i.proto.data_type.filter(|&e| e != 0) {
            t.insert(i.name().to_string(), e);
        }
    }
    for (_, n) in g.nodes() {
        let inputs: Vec<Option<i32>> = n.input.iter().map(|i| t.get(i.as_str()).copied()).collect();
        let outs = rule(n, &inputs);
        for (k, o) in n.output.iter().enumerate() {
            if o.is_empty() || t.contains_key(o.as_str()) {
                continue;
            }
            if let Some(e) = outs.get(k).copied().flatten() {
                t.insert(o.clone(), e);
            }
        }
    }
    t
}

/// Output element types of node `n` given its inputs' (unknown entries are `None`).
fn rule(n: &crate::onnx::proto::NodeProto, inputs: &[Option<i32>]) -> Vec<Option<i32>> {
    let count = n.output.len();
    let input = |k: usize| inputs.get(k).copied().flatten();
    let first = inputs.iter().copied().flatten().next();
    let attr_int = |name: &str| node_attr(n, name).and_then(|a| a.i).map(|v| v as i32);
    let all = |e: Option<i32>| vec![e; count];
    let op = n.op_type.as_deref().unwrap_or("");
    match op {
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => all(Some(INT64)),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or"
        | "Xor" | "IsNaN" | "IsInf" => all(Some(BOOL)),
        "Cast" => all(attr_int("to")),
        "CastLike" => all(input(1)),
        "TopK" => vec![input(0), Some(INT64)],
        "Unique" => vec![input(0), Some(INT64), Some(INT64), Some(INT64)],
        "Dropout" => vec![input(0), Some(BOOL)],
        "Where" => all(input(1).or(input(2))),
        "OneHot" => all(input(2)),
        "Constant" => all(constant_type(n)),
        "ConstantOfShape" => all(Some(
            node_attr(n, "value")
                .and_then(|a| a.t.as_ref())
                .and_then(|t| t.data_type)
                .map_or(FLOAT, |d| d),
        )),
        "MatMulInteger" | "ConvInteger" => all(Some(INT32)),
        "DynamicQuantizeLinear" => vec![Some(UINT8), Some(FLOAT), Some(UINT8)],
        "QuantizeLinear" => all(attr_int("output_dtype")
            .filter(|&d| d != 0)
            .or(input(2))
            .or(Some(UINT8))),
        "DequantizeLinear" => all(attr_int("output_dtype").filter(|&d| d != 0).or(input(1))),
        "GatherBlockQuantized" => all(input(2)),
        "EyeLike" | "RandomNormalLike" | "RandomUniformLike" => all(attr_int("dtype").or(first)),
        "RandomNormal" | "RandomUniform" => all(attr_int("dtype").or(Some(FLOAT))),
        "Multinomial" => all(attr_int("dtype").or(Some(INT32))),
        "LayerNormalization" | "SimplifiedLayerNormalization" => {
            let mut v = vec![Some(FLOAT); count];
            if let Some(o) = v.first_mut() {
                *o = input(0);
            }
            v
        }
        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" => (0..count)
            .map(|k| {
                if k == 0 || k == 3 {
                    input(0)
                } else {
                    Some(FLOAT)
                }
            })
            .collect(),
        "If" => subgraph_outputs(n, "then_branch", 0),
        "Loop" => subgraph_outputs(n, "body", 1),
        "Scan" => subgraph_outputs(n, "body", 0),
        _ => all(first),
    }
}

/// The type of a `Constant` node's value.
fn constant_type(n: &crate::onnx::proto::NodeProto) -> Option<i32> {
    let a = n.attribute.first()?;
    match a.name.as_deref()? {
        "value" => a.t.as_ref()?.data_type,
        "value_float" | "value_floats" => Some(FLOAT),
        "value_int" | "value_ints" => Some(INT64),
        "sparse_value" => a.sparse_tensor.as_ref()?.values.as_ref()?.data_type,
        _ => None,
    }
}

/// Output types of a control-flow node from its subgraph's declared outputs, skipping the
/// first `skip` (a loop body's condition).
fn subgraph_outputs(
    n: &crate::onnx::proto::NodeProto,
    attr: &str,
    skip: usize,
) -> Vec<Option<i32>> {
    let g: Option<&GraphProto> = node_attr(n, attr).and_then(|a| a.g.as_ref());
    (0..n.output.len())
        .map(|k| g.and_then(|g| g.output.get(k + skip)).and_then(declared))
        .collect()
}

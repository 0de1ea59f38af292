//! Constant values seen through the graph: initializers and `Constant` nodes.
use crate::ir::Graph;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::TensorProto;
use crate::onnx::tensor::inline_bytes;

/// The value a chain of `Identity` nodes starts from (exporters write one initializer for
/// identical weights and alias the duplicates through `Identity`, e.g. TorchScript).
pub fn through_identity<'g>(g: &'g Graph, value: &'g str) -> &'g str {
    let mut v = value;
    for _ in 0..16 {
        match g.producer(v).and_then(|id| g.node(id)) {
            Some(n) if n.op_type.as_deref() == Some("Identity") && !n.input.is_empty() => {
                v = &n.input[0];
            }
            _ => break,
        }
    }
    v
}

/// A constant's dims (the tensor proto, for `Constant` nodes the `value` attribute).
pub fn const_proto<'g>(g: &'g Graph, value: &'g str) -> Option<&'g TensorProto> {
    let value = through_identity(g, value);
    if let Some(i) = g.initializer(value) {
        return Some(&i.proto);
    }
    let n = g.node(g.producer(value)?)?;
    if n.op_type.as_deref() != Some("Constant") {
        return None;
    }
    crate::ir::node_attr(n, "value").and_then(|a| a.t.as_ref())
}

/// Whether `value` is a constant (initializer or `Constant` node output).
pub fn is_const(g: &Graph, value: &str) -> bool {
    let value = through_identity(g, value);
    if g.initializer(value).is_some() {
        return true;
    }
    g.producer(value)
        .and_then(|id| g.node(id))
        .is_some_and(|n| n.op_type.as_deref() == Some("Constant"))
}

/// Dims of a constant tensor.
pub fn const_dims(g: &Graph, value: &str) -> Option<Vec<i64>> {
    if let Some(t) = const_proto(g, value) {
        return Some(t.dims.clone());
    }
    // Constant nodes with value_int(s)/value_float(s).
    let n = g.node(g.producer(value)?)?;
    if n.op_type.as_deref() != Some("Constant") {
        return None;
    }
    let a = n.attribute.first()?;
    match a.name.as_deref()? {
        "value_int" | "value_float" => Some(vec![]),
        "value_ints" => Some(vec![a.ints.len() as i64]),
        "value_floats" => Some(vec![a.floats.len() as i64]),
        _ => None,
    }
}

/// Integer values of a small constant (int64/int32/bool tensors, `value_int(s)`).
pub fn const_ints(g: &Graph, value: &str) -> Option<Vec<i64>> {
    if let Some(t) = const_proto(g, value) {
        let b = match g.initializer(value) {
            Some(i) => i.bytes().ok()?,
            None => inline_bytes(t).ok()?,
        };
        return match DataType::try_from(t.data_type?).ok()? {
            DataType::Int64 => Some(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DataType::Int32 => Some(
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            DataType::Bool | DataType::Uint8 => Some(b.iter().map(|&x| x as i64).collect()),
            _ => None,
        };
    }
    let n = g.node(g.producer(value)?)?;
    let a = n.attribute.first()?;
    match a.name.as_deref()? {
        "value_int" => Some(vec![a.i?]),
        "value_ints" => Some(a.ints.clone()),
        _ => None,
    }
}

/// Float values of a small constant (float/double/float16 tensors, `value_float(s)`).
pub fn const_floats(g: &Graph, value: &str) -> Option<Vec<f32>> {
    if let Some(t) = const_proto(g, value) {
        let b = match g.initializer(value) {
            Some(i) => i.bytes().ok()?,
            None => inline_bytes(t).ok()?,
        };
        return crate::onnx::tensor::to_f32(t.data_type?, &b);
    }
    let n = g.node(g.producer(value)?)?;
    let a = n.attribute.first()?;
    match a.name.as_deref()? {
        "value_float" => Some(vec![a.f?]),
        "value_floats" => Some(a.floats.clone()),
        _ => None,
    }
}

/// The single integer of a scalar (or one-element) constant.
pub fn const_scalar_int(g: &Graph, value: &str) -> Option<i64> {
    match const_ints(g, value)?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// The single float of a scalar (or one-element) constant.
pub fn const_scalar_float(g: &Graph, value: &str) -> Option<f32> {
    match const_floats(g, value)?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

//! A small builder for ONNX models, for tests and for the passes' own emission.
use crate::onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// A dimension of a declared input/output shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named symbolic size (`batch`, `seq`).
    Sym(String),
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Sym(v.to_string())
    }
}

/// A value info of a tensor with element type `elem` and shape `dims`.
pub fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Sym(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            denotation: None,
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        ..Default::default()
    }
}

/// A float32 tensor stored as raw little-endian bytes.
pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(
            data.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        ..Default::default()
    }
}

/// A floating-point tensor of element type `dtype` (float, float16 or bfloat16; values
/// rounded to nearest) stored as raw little-endian bytes.
pub fn tensor_float(name: &str, dims: &[i64], data: &[f32], dtype: i32) -> TensorProto {
    let raw: Vec<u8> = if dtype == DataType::Float16 as i32 {
        data.iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()
    } else if dtype == DataType::Bfloat16 as i32 {
        data.iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect()
    } else {
        return tensor_f32(name, dims, data);
    };
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(dtype),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

/// A uint8 tensor.
pub fn tensor_u8(name: &str, dims: &[i64], data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Uint8 as i32),
        raw_data: Some(data.into()),
        ..Default::default()
    }
}

/// Rounds `v` to the nearest value of floating-point type `dtype` (float, float16, bfloat16).
pub fn round_to(v: f32, dtype: i32) -> f32 {
    if dtype == DataType::Float16 as i32 {
        half::f16::from_f32(v).to_f32()
    } else if dtype == DataType::Bfloat16 as i32 {
        half::bf16::from_f32(v).to_f32()
    } else {
        v
    }
}

/// An int64 tensor stored as raw little-endian bytes.
pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(
            data.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

/// A float attribute.
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A string attribute.
pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec().into()),
        ..Default::default()
    }
}

/// A tensor attribute.
pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

/// A graph attribute (If/Loop/Scan bodies).
pub fn attr_graph(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

/// A node.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.to_string()),
        name: Some(name.to_string()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// Builds a model proto one piece at a time.
#[derive(Debug, Clone)]
pub struct ModelBuilder {
    graph: GraphProto,
    opsets: Vec<(String, i64)>,
    ir_version: i64,
}

impl ModelBuilder {
    /// A model with a graph called `name`, default-domain opset 18, IR version 8.
    pub fn new(name: &str) -> Self {
        ModelBuilder {
            graph: GraphProto {
                name: Some(name.to_string()),
                ..Default::default()
            },
            opsets: vec![(String::new(), 18)],
            ir_version: 8,
        }
    }

    /// Adds an opset import (`""` is the default domain).
    pub fn opset(mut self, domain: &str, version: i64) -> Self {
        self.opsets.retain(|(d, _)| d != domain);
        self.opsets.push((domain.to_string(), version));
        self
    }

    /// Declares a graph input.
    pub fn input(mut self, name: &str, elem: DataType, dims: &[Dim]) -> Self {
        self.graph.input.push(value_info(name, elem, dims));
        self
    }

    /// Declares a graph output.
    pub fn output(mut self, name: &str, elem: DataType, dims: &[Dim]) -> Self {
        self.graph.output.push(value_info(name, elem, dims));
        self
    }

    /// Adds an initializer.
    pub fn init(mut self, t: TensorProto) -> Self {
        self.graph.initializer.push(t);
        self
    }

    /// Adds a node.
    pub fn node(mut self, n: NodeProto) -> Self {
        self.graph.node.push(n);
        self
    }

    /// The finished model proto.
    pub fn build(self) -> ModelProto {
        ModelProto {
            ir_version: Some(self.ir_version),
            producer_name: Some("smoe-opt".into()),
            opset_import: self
                .opsets
                .into_iter()
                .map(|(d, v)| OperatorSetIdProto {
                    domain: Some(d),
                    version: Some(v),
                })
                .collect(),
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}

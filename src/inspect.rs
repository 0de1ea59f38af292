//! `smoe-opt inspect`: a summary of a model, read without touching tensor data.
use crate::model::Model;
use crate::onnx::proto::{
    tensor_shape_proto::dimension::Value as DimValue, type_proto, ValueInfoProto,
};
use crate::onnx::{dtype, tensor, ExternalFile};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Machine-readable summary of a model (the `inspect --json` schema).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Inspection {
    /// The model file.
    pub file: String,
    /// IR version.
    pub ir_version: i64,
    /// `producer_name producer_version`.
    pub producer: String,
    /// Opset imports (`""` = default ONNX domain).
    pub opsets: Vec<Opset>,
    /// Graph inputs that are not initializers.
    pub inputs: Vec<ValueDesc>,
    /// Graph outputs.
    pub outputs: Vec<ValueDesc>,
    /// Number of nodes in the main graph.
    pub nodes: usize,
    /// Main-graph node counts by op type (`domain::Op` outside the default domain).
    pub ops: BTreeMap<String, usize>,
    /// Nodes inside subgraphs (If/Loop/Scan bodies), counted separately.
    pub subgraph_nodes: usize,
    /// Number of model-local functions.
    pub functions: usize,
    /// Main-graph initializers.
    pub initializers: InitStats,
    /// External data files.
    pub external_data: Vec<ExternalFile>,
    /// Detected MoE blocks, in graph order.
    pub moe_blocks: Vec<BlockSummary>,
    /// Problems found while detecting MoE blocks (broken exports, unrecognised routers).
    pub diagnostics: Vec<String>,
    /// Selection nodes (TopK/ArgMax/fused ops) that were not recognised, with the reason.
    pub near_misses: Vec<crate::moe::NearMiss>,
}

/// One MoE block as `inspect` reports it (stable JSON keys).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BlockSummary {
    /// `moe.<i>`, in graph order.
    pub name: String,
    /// Exporter form: `per-expert`, `batched3d`, `ort-fused`.
    pub form: crate::moe::Form,
    /// N, the number of experts the router scores.
    pub experts: usize,
    /// Indices of the experts present in the graph.
    pub experts_present: Vec<usize>,
    /// False when a trace bound chains to experts by position, so indices are unknown.
    pub experts_identified: bool,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// Expert intermediate size I.
    pub intermediate: usize,
    /// `swiglu`, `geglu`, `relu`, `gelu`, `gelu-tanh`, `silu`, `identity`, `swiglu-clamped`.
    pub activation: String,
    /// The parameters of a parametrised activation (`swiglu-clamped`), else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation_params: Option<ActivationParams>,
    /// Element type of the block's weights (`float`, `float16`, `bfloat16`).
    pub dtype: String,
    /// Whether the top-k weights are renormalised.
    pub renormalize: bool,
    /// `softmax`, `softmax-after-topk`, `sigmoid`.
    pub router_scoring: crate::moe::Scoring,
    /// Whether the router has a bias.
    pub router_bias: bool,
    /// Whether a bias is added to the scores for the choice only (DeepSeek-V3).
    pub selection_bias: bool,
    /// Group-limited choice `[groups, groups kept]` (DeepSeek-V3), or null.
    pub groups: Option<[usize; 2]>,
    /// Routed scaling factor applied to the weights (1 if none).
    pub routed_scaling: f32,
    /// Sparsemixer's jitter eps (PhiMoE), or null.
    pub sparsemixer_eps: Option<f32>,
    /// Switch capacity (tokens per expert per sequence), or null.
    pub capacity: Option<usize>,
    /// Number of shared (always-on) experts.
    pub shared_experts: usize,
    /// Whether expert projections carry biases.
    pub expert_biases: bool,
    /// Bytes of routed expert weights (QMoE: codes, scales and biases).
    pub expert_bytes: u64,
    /// QMoE integer quantisation of the expert weights, or null.
    pub quantization: Option<QuantSummary>,
    /// Block input and output values.
    pub input: String,
    /// Block output value.
    pub output: String,
    /// Number of graph nodes the block covers.
    pub nodes: usize,
}

/// How a QMoE block's expert weights are quantised.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct QuantSummary {
    /// Bits per weight of fc1 (gate/up) and fc2 (down).
    pub bits: [u32; 2],
    /// Inputs per scale block (0: one scale per output row).
    pub block_size: usize,
}

/// gpt-oss's SwiGLU parameters: `min(g, limit)·σ(alpha·min(g, limit))·(clamp(u, ±limit) + beta)`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ActivationParams {
    /// Slope inside the sigmoid.
    pub alpha: f32,
    /// Added to the clamped up projection.
    pub beta: f32,
    /// Clamp limit, or null.
    pub limit: Option<f32>,
}

impl BlockSummary {
    /// Summarises a block (`g`: the graph holding its weights).
    pub fn new(g: &crate::ir::Graph, b: &crate::moe::MoeBlock, identified: bool) -> Self {
        let first = b.experts.first().map(|e| &e.ffn);
        BlockSummary {
            name: b.name.clone(),
            form: b.form,
            experts: b.router.num_experts,
            experts_present: b.present(),
            experts_identified: identified,
            top_k: b.router.top_k,
            hidden: b.hidden(),
            intermediate: b.intermediate(),
            activation: first.map(|f| f.activation_name()).unwrap_or_default(),
            activation_params: first.and_then(|f| match f.act {
                crate::moe::Act::SwigluClamped { alpha, beta, limit } => {
                    Some(ActivationParams { alpha, beta, limit })
                }
                _ => None,
            }),
            dtype: dtype::name(b.weight_dtype(g)),
            renormalize: b.router.renormalize,
            router_scoring: b.router.scoring,
            router_bias: b.router.bias.is_some(),
            selection_bias: b.router.selection_bias.is_some(),
            groups: b.router.groups.map(|g| [g.count, g.top]),
            routed_scaling: b.router.scale,
            sparsemixer_eps: b.router.jitter_eps,
            capacity: b.router.capacity,
            shared_experts: b.shared.len(),
            expert_biases: first.is_some_and(|f| f.up_bias.is_some() || f.down_bias.is_some()),
            expert_bytes: b.expert_bytes,
            quantization: b.quant().map(|[a, d]| QuantSummary {
                bits: [a.bits, d.bits],
                block_size: a.block,
            }),
            input: b.input.clone(),
            output: b.output.clone(),
            nodes: b.nodes.len(),
        }
    }
}

/// An opset import.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Opset {
    /// Domain (`""` = ai.onnx).
    pub domain: String,
    /// Version.
    pub version: i64,
}

/// A graph input or output.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ValueDesc {
    /// Name.
    pub name: String,
    /// Element type (`float`, `int64`, …), or `?`.
    pub dtype: String,
    /// Dimensions: numbers, symbolic names, or null for unknown. Null shape = unknown rank.
    pub shape: Option<Vec<serde_json::Value>>,
}

/// Initializer statistics.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct InitStats {
    /// Number of initializers.
    pub count: usize,
    /// Total bytes of tensor data.
    pub bytes: u64,
    /// Per element type: count and bytes.
    pub by_dtype: BTreeMap<String, DtypeStats>,
}

/// Count and bytes of one element type.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct DtypeStats {
    /// Number of tensors.
    pub count: usize,
    /// Bytes of data.
    pub bytes: u64,
}

/// Describes a value info.
pub fn describe(v: &ValueInfoProto) -> ValueDesc {
    let name = v.name.clone().unwrap_or_default();
    let tensor = v.r#type.as_ref().and_then(|t| match &t.value {
        Some(type_proto::Value::TensorType(t)) => Some(t),
        _ => None,
    });
    let dtype = tensor
        .and_then(|t| t.elem_type)
        .map(dtype::name)
        .unwrap_or_else(|| "?".into());
    let shape = tensor.and_then(|t| t.shape.as_ref()).map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(DimValue::DimValue(v)) => serde_json::Value::from(*v),
                Some(DimValue::DimParam(p)) => serde_json::Value::from(p.clone()),
                None => serde_json::Value::Null,
            })
            .collect()
    });
    ValueDesc { name, dtype, shape }
}

/// The JSON Schema of `inspect --json`, generated from the Rust types (committed as
/// `schemas/inspect.schema.json`; new keys may be added, existing keys keep their meaning).
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Inspection)).expect("a schema serialises")
}

/// Summarises a model. Reads only protobuf fields and file sizes, never tensor data.
pub fn inspect(model: &Model) -> Inspection {
    let g = &model.graph;
    let det = crate::moe::detect(g);
    let mut ops = BTreeMap::new();
    let mut subgraph_nodes = 0;
    for (_, n) in g.nodes() {
        let op = n.op_type.clone().unwrap_or_default();
        let key = match n.domain.as_deref() {
            None | Some("") | Some("ai.onnx") => op,
            Some(d) => format!("{d}::{op}"),
        };
        *ops.entry(key).or_insert(0) += 1;
        for a in &n.attribute {
            for sg in a.g.iter().chain(a.graphs.iter()) {
                subgraph_nodes += count_nodes(sg);
            }
        }
    }
    let mut initializers = InitStats::default();
    for i in g.initializers() {
        let bytes = tensor::declared_bytes(&i.proto).ok().flatten().unwrap_or(0);
        initializers.count += 1;
        initializers.bytes += bytes;
        let e = initializers
            .by_dtype
            .entry(dtype::name(i.proto.data_type.unwrap_or(0)))
            .or_default();
        e.count += 1;
        e.bytes += bytes;
    }
    Inspection {
        file: model
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        ir_version: model.ir_version(),
        producer: model.producer(),
        opsets: model
            .opsets()
            .iter()
            .map(|o| Opset {
                domain: o.domain.clone().unwrap_or_default(),
                version: o.version.unwrap_or(0),
            })
            .collect(),
        inputs: g.data_inputs().map(describe).collect(),
        outputs: g.outputs().iter().map(describe).collect(),
        nodes: g.node_count(),
        ops,
        subgraph_nodes,
        functions: model.header().functions.len(),
        initializers,
        external_data: model.external_files(),
        moe_blocks: det
            .blocks
            .iter()
            .zip(&det.identified)
            .map(|(b, &i)| BlockSummary::new(g, b, i))
            .collect(),
        diagnostics: det.diagnostics,
        near_misses: det.near_misses,
    }
}

fn count_nodes(g: &crate::onnx::proto::GraphProto) -> usize {
    g.node.len()
        + g.node
            .iter()
            .flat_map(|n| n.attribute.iter())
            .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
            .map(count_nodes)
            .sum::<usize>()
}

/// Human-readable bytes (`1.5 MiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn shape_str(v: &ValueDesc) -> String {
    match &v.shape {
        None => "?".into(),
        Some(d) => {
            let parts: Vec<String> = d
                .iter()
                .map(|x| match x {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "?".into(),
                    other => other.to_string(),
                })
                .collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

impl Inspection {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "model      {}", self.file);
        let _ = writeln!(
            s,
            "ir_version {}   producer: {}",
            self.ir_version, self.producer
        );
        let opsets: Vec<String> = self
            .opsets
            .iter()
            .map(|o| {
                format!(
                    "{}={}",
                    if o.domain.is_empty() {
                        "ai.onnx"
                    } else {
                        &o.domain
                    },
                    o.version
                )
            })
            .collect();
        let _ = writeln!(s, "opsets     {}", opsets.join(", "));
        let _ = writeln!(s, "\ninputs");
        for v in &self.inputs {
            let _ = writeln!(s, "  {:<32} {:<8} {}", v.name, v.dtype, shape_str(v));
        }
        let _ = writeln!(s, "outputs");
        for v in &self.outputs {
            let _ = writeln!(s, "  {:<32} {:<8} {}", v.name, v.dtype, shape_str(v));
        }
        let _ = writeln!(
            s,
            "\nnodes      {} ({} in subgraphs, {} functions)",
            self.nodes, self.subgraph_nodes, self.functions
        );
        let mut ops: Vec<_> = self.ops.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, n) in ops {
            let _ = writeln!(s, "  {op:<32} {n:>6}");
        }
        let _ = writeln!(
            s,
            "\ninitializers {} tensors, {}",
            self.initializers.count,
            human_bytes(self.initializers.bytes)
        );
        for (d, st) in &self.initializers.by_dtype {
            let _ = writeln!(
                s,
                "  {d:<12} {:>6} tensors {:>12}",
                st.count,
                human_bytes(st.bytes)
            );
        }
        if !self.external_data.is_empty() {
            let _ = writeln!(s, "\nexternal data");
            for f in &self.external_data {
                let _ = writeln!(s, "  {:<40} {:>12}", f.location, human_bytes(f.bytes));
            }
        }
        let _ = writeln!(s, "\nMoE blocks: {}", self.moe_blocks.len());
        if !self.moe_blocks.is_empty() {
            let _ = writeln!(
                s,
                "  {:<7} {:<11} {:>7} {:>5} {:>4} {:>5} {:>5} {:<14} {:<7} {:<18} {:>6} {:>12}",
                "block",
                "form",
                "experts",
                "top-k",
                "cap",
                "H",
                "I",
                "act",
                "renorm",
                "scoring",
                "shared",
                "expert bytes"
            );
            for b in &self.moe_blocks {
                let present = if b.experts_present.len() == b.experts {
                    format!("{}", b.experts)
                } else {
                    format!("{}/{}", b.experts_present.len(), b.experts)
                };
                let form = serde_json::to_value(b.form)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                let scoring = serde_json::to_value(b.router_scoring)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                let _ =
                    writeln!(
                    s,
                    "  {:<7} {:<11} {:>7} {:>5} {:>4} {:>5} {:>5} {:<14} {:<7} {:<18} {:>6} {:>12}",
                    b.name,
                    form,
                    present,
                    b.top_k,
                    b.capacity.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    b.hidden,
                    b.intermediate,
                    b.activation,
                    if b.renormalize { "yes" } else { "no" },
                    scoring,
                    b.shared_experts,
                    human_bytes(b.expert_bytes)
                );
            }
            for b in &self.moe_blocks {
                let mut extra = Vec::new();
                if b.selection_bias {
                    extra.push("a selection-only score bias".to_string());
                }
                if let Some([count, top]) = b.groups {
                    extra.push(format!("experts in {count} groups, best {top} eligible"));
                }
                if b.routed_scaling != 1.0 {
                    extra.push(format!("weights scaled by {}", b.routed_scaling));
                }
                if !extra.is_empty() {
                    let _ = writeln!(s, "  {} router: {}", b.name, extra.join(", "));
                }
                if let Some(q) = &b.quantization {
                    let block = match q.block_size {
                        0 => "one scale per row".to_string(),
                        n => format!("scales per {n} inputs"),
                    };
                    let _ = writeln!(
                        s,
                        "  {} experts: QMoE int{}/int{} (fc1/fc2), {block}",
                        b.name, q.bits[0], q.bits[1]
                    );
                }
            }
        }
        if !self.diagnostics.is_empty() {
            let _ = writeln!(s, "\ndiagnostics");
            for d in &self.diagnostics {
                let _ = writeln!(s, "  ! {d}");
            }
        }
        s
    }

    /// Why each near-miss was rejected (`inspect --explain`).
    pub fn explain_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\nnear-misses: {}", self.near_misses.len());
        for m in &self.near_misses {
            let kind = if m.moe_like {
                "MoE-like"
            } else {
                "not a router"
            };
            let _ = writeln!(s, "  {} [{kind}]: {}", m.node, m.reason);
        }
        s
    }
}

//! `MoeBlock`: the canonical description of one Mixture-of-Experts block, whatever
//! exporter form it was found in. Every later pass works on this, never on the raw graph.
use crate::ir::NodeId;
use serde::Serialize;

/// The exporter form a block was recognised in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// One unrolled chain per expert over 2-D weights (TorchScript export of HF experts;
    /// transformers v5 stacked weights appear here too once the exporter folds the slice).
    PerExpert,
    /// Batched experts: stacked 3-D weights gathered by the chosen expert ids (dynamo
    /// export of transformers v5 `batched_mm`).
    Batched3d,
    /// onnxruntime's fused `com.microsoft.MoE`.
    OrtFused,
    /// Dense all-experts: every expert runs on every token, outputs scaled by a [T, N]
    /// weight matrix that is zero outside the top-k ("dense fallback" exports).
    DenseAll,
}

/// How router logits become routing scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// Softmax over all N logits, then top-k.
    Softmax,
    /// Top-k over the logits, then softmax over the k chosen (gpt-oss).
    SoftmaxAfterTopk,
    /// Element-wise sigmoid scores (DeepSeek-V3 style).
    Sigmoid,
    /// PhiMoE's sparsemixer (top-2): the best expert, weighted by the softmax over the logits
    /// within a relative `2·eps` of the best; then the best of the others, weighted by the
    /// softmax over the others within `2·eps` of it (no renormalisation; see
    /// [`Router::jitter_eps`]).
    Sparsemixer,
}

/// A matrix in canonical orientation `[out, in]` (as a torch `Linear` weight), read from
/// a graph tensor: optionally one expert's slice of a stacked 3-D tensor, optionally
/// transposed, optionally a strided subset of rows (fused gate/up halves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightRef {
    /// Initializer (or Constant node output) holding the data.
    pub tensor: String,
    /// Index into the first axis of a stacked 3-D tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert: Option<usize>,
    /// The stored 2-D matrix is `[in, out]` and must be transposed.
    pub transpose: bool,
    /// Rows `start, start+step, …` (count `out`) of the canonical matrix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<RowSel>,
    /// Canonical shape `[out, in]` (after selection).
    pub shape: [usize; 2],
    /// The tensor holds QMoE integer codes (`[N, out, in/pack]` bytes) dequantised with these
    /// scales.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quant: Option<super::quant::Quant>,
}

/// A strided row selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RowSel {
    /// First row.
    pub start: usize,
    /// Row step (1 = contiguous halves, 2 = interleaved).
    pub step: usize,
}

/// A bias vector, possibly one expert's row of a stacked 2-D bias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BiasRef {
    /// Tensor holding the data.
    pub tensor: String,
    /// Row of a stacked `[N, out]` bias.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert: Option<usize>,
    /// Strided subset (fused gate/up biases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<RowSel>,
    /// Length.
    pub len: usize,
}

/// Element-wise nonlinearity of an FFN (applied to the gate in gated FFNs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Act {
    /// x·sigmoid(x).
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU.
    GeluTanh,
    /// max(x, 0).
    Relu,
    /// No nonlinearity.
    Identity,
    /// gpt-oss's SwiGLU (gated FFNs only): with `g' = min(g, limit)` and
    /// `u' = clamp(u, -limit, limit)`, the hidden unit is `g'·σ(alpha·g')·(u' + beta)`
    /// (onnxruntime's `activation_alpha`, `activation_beta`, `swiglu_limit`).
    SwigluClamped {
        /// Slope inside the sigmoid (1.702 in gpt-oss).
        alpha: f32,
        /// Added to the clamped up projection (1 in gpt-oss).
        beta: f32,
        /// Clamp limit (7 in gpt-oss), if any.
        limit: Option<f32>,
    },
}

impl Act {
    /// The nonlinearity at `v` (for [`Act::SwigluClamped`], its gate part).
    pub fn eval(self, v: f32) -> f32 {
        match self {
            Act::Silu => v / (1.0 + (-v).exp()),
            Act::SwigluClamped { alpha, limit, .. } => {
                let g = limit.map_or(v, |l| v.min(l));
                g / (1.0 + (-alpha * g).exp())
            }
            Act::Relu => v.max(0.0),
            Act::Identity => v,
            Act::Gelu => 0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2)),
            Act::GeluTanh => {
                let c = (2.0f32 / std::f32::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            }
        }
    }
}

impl Act {
    /// A gated FFN's hidden unit from its gate `g` and up `u` pre-activations.
    pub fn gated(self, g: f32, u: f32) -> f32 {
        match self {
            Act::SwigluClamped { beta, limit, .. } => {
                let u = limit.map_or(u, |l| u.clamp(-l, l));
                self.eval(g) * (u + beta)
            }
            _ => self.eval(g) * u,
        }
    }
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit).
pub fn erf(x: f32) -> f32 {
    let z = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    let v = 1.0 - r;
    (if x >= 0.0 { v } else { -v }) as f32
}

/// One feed-forward network: plain (`up` → act → `down`) or gated
/// (act(`gate`)·`up` → `down`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ffn {
    /// Gate projection `[I, H]` (gated FFNs only).
    pub gate: Option<WeightRef>,
    /// Up (or in) projection `[I, H]`.
    pub up: WeightRef,
    /// Down (or out) projection `[H, I]`.
    pub down: WeightRef,
    /// Bias of the gate projection.
    pub gate_bias: Option<BiasRef>,
    /// Bias of the up projection.
    pub up_bias: Option<BiasRef>,
    /// Bias of the down projection.
    pub down_bias: Option<BiasRef>,
    /// The nonlinearity.
    pub act: Act,
}

impl Ffn {
    /// Intermediate size I.
    pub fn intermediate(&self) -> usize {
        self.up.shape[0]
    }

    /// Hidden size H.
    pub fn hidden(&self) -> usize {
        self.up.shape[1]
    }

    /// The activation as users name it (`swiglu`, `geglu`, `relu`, …).
    pub fn activation_name(&self) -> String {
        let a = match self.act {
            Act::Silu => "silu",
            Act::Gelu => "gelu",
            Act::GeluTanh => "gelu-tanh",
            Act::Relu => "relu",
            Act::Identity => "identity",
            Act::SwigluClamped { .. } => "swiglu-clamped",
        };
        match (self.gate.is_some(), self.act) {
            (true, Act::Silu) => "swiglu".into(),
            (true, Act::SwigluClamped { .. }) => a.into(),
            (true, Act::Gelu | Act::GeluTanh) => "geglu".into(),
            (true, _) => format!("gated-{a}"),
            (false, _) => a.into(),
        }
    }

    /// Number of weight and bias elements.
    pub fn params(&self) -> usize {
        let m = |w: &WeightRef| w.shape[0] * w.shape[1];
        let b = |b: &Option<BiasRef>| b.as_ref().map_or(0, |b| b.len);
        self.gate.as_ref().map_or(0, m)
            + m(&self.up)
            + m(&self.down)
            + b(&self.gate_bias)
            + b(&self.up_bias)
            + b(&self.down_bias)
    }
}

/// The router.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Router {
    /// Router weight, canonical `[N, H]`.
    pub weight: WeightRef,
    /// Router bias `[N]`.
    pub bias: Option<BiasRef>,
    /// N, the number of experts the router scores.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// How scores are computed.
    pub scoring: Scoring,
    /// Whether the chosen weights are renormalised to sum to 1.
    pub renormalize: bool,
    /// Switch-style expert capacity (tokens per expert per sequence), if any.
    pub capacity: Option<usize>,
    /// Added to the scores for the choice of experts only; the weights are the unbiased
    /// scores (DeepSeek-V3's `e_score_correction_bias`).
    pub selection_bias: Option<BiasRef>,
    /// Group-limited choice (DeepSeek-V3): only experts of the best groups are eligible.
    pub groups: Option<Groups>,
    /// Routed scaling factor multiplied into the weights after renormalisation (1 if none).
    pub scale: f32,
    /// Sparsemixer's jitter eps: expert `j` takes part in the softmax of the pick with maximum
    /// `m` when `(m − z_j) / max(|z_j|, m) ≤ 2·eps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter_eps: Option<f32>,
    /// The node producing the router logits.
    pub logits: String,
}

/// Group-limited top-k: the N experts form `count` equal groups of consecutive experts; a
/// group is scored by the sum of its two best choice scores, and the experts of all but the
/// best `top` groups are masked out before the top-k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Groups {
    /// Number of groups (divides N).
    pub count: usize,
    /// Groups kept per token.
    pub top: usize,
}

/// A routed expert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expert {
    /// Its index in the router's N.
    pub index: usize,
    /// Its network.
    pub ffn: Ffn,
}

/// A shared (always-on) expert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SharedExpert {
    /// Its network.
    pub ffn: Ffn,
    /// Sigmoid gate weight `[1, H]`, if the output is scaled by sigmoid(x·g).
    pub gate: Option<WeightRef>,
}

/// One detected MoE block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeBlock {
    /// A readable name (from the router node).
    pub name: String,
    /// The exporter form.
    pub form: Form,
    /// The block's input value (hidden states).
    pub input: String,
    /// The block's output value.
    pub output: String,
    /// The router.
    pub router: Router,
    /// Routed experts present in the graph, by index.
    pub experts: Vec<Expert>,
    /// Shared experts.
    pub shared: Vec<SharedExpert>,
    /// Graph nodes the block covers (in graph order).
    #[serde(skip)]
    pub nodes: Vec<NodeId>,
    /// Bytes of routed expert weights.
    pub expert_bytes: u64,
}

impl MoeBlock {
    /// Hidden size H.
    pub fn hidden(&self) -> usize {
        self.router.weight.shape[1]
    }

    /// The QMoE quantisation of the experts' projections (gate/up, down), when quantised.
    pub fn quant(&self) -> Option<[&super::quant::Quant; 2]> {
        let f = &self.experts.first()?.ffn;
        Some([f.up.quant.as_ref()?, f.down.quant.as_ref()?])
    }

    /// Expert intermediate size I (of the first present expert).
    pub fn intermediate(&self) -> usize {
        self.experts.first().map_or(0, |e| e.ffn.intermediate())
    }

    /// ONNX element type of the block's weights (its router weight's; float when unknown),
    /// read from `g`, the graph holding them.
    pub fn weight_dtype(&self, g: &crate::ir::Graph) -> i32 {
        super::consts::const_proto(g, &self.router.weight.tensor)
            .and_then(|t| t.data_type)
            .unwrap_or(crate::onnx::proto::tensor_proto::DataType::Float as i32)
    }

    /// Indices of the experts present in the graph.
    pub fn present(&self) -> Vec<usize> {
        self.experts.iter().map(|e| e.index).collect()
    }
}

//! Compression, the "C" of MC-SMoE, without retraining: expert projections rewritten as
//! activation-aware low-rank MatMul pairs, a shared base plus low-rank deltas, or a kept
//! subset of intermediate neurons with a least-squares refit — under a byte budget, after
//! an optional merge (`--keep`/`--experts`).
//!
//! - `low-rank`: every projection gets an activation-aware SVD (whitened by its routed
//!   inputs' Gram: gate/up by the expert's routed hidden states, down by its intermediate
//!   activations); one global greedy allocation over all matrices (energies normalised per
//!   layer and matrix type) picks the ranks; a matrix whose rank would not save bytes stays
//!   dense (`passes/allocate_ranks.rs`).
//! - `base-delta`: per layer a frequency-weighted base (stored once) and per-expert
//!   activation-aware low-rank deltas (`passes/base_delta.rs`); the router still dispatches to
//!   every expert.
//! - `neurons`: each expert keeps its most important intermediate neurons, and the kept down
//!   columns are refitted by least squares on the routed tokens (`passes/prune_neurons.rs`,
//!   `passes/refit_down.rs`).
//! - `auto` (default): per layer, every family above at a grid of byte fractions, and merging
//!   (m-smoe at 3/4, 1/2 and 1/4 of the experts, merged down projections refitted to the
//!   routing-weighted outputs of their members) alone or followed by low rank, each measured
//!   by its calibrated error: the relative squared error of the layer's output on routed
//!   calibration tokens. Layers then get byte budgets by a greedy over the lower convex hull
//!   of their (bytes, error) candidates — the smallest summed error that fits the budget —
//!   and the plan is compared with the global low-rank plan; the lower total error wins.
//!
//! Budgets count the routed experts' stored elements (weights and biases; shared bases
//! once) of the chosen layers, at 4 bytes each. The plan never stores more than the budget.
//! QMoE layers (int4/int8 `com.microsoft.QMoE`) hold dense quantised experts only: they are
//! compressed by merging and neuron pruning, and their bytes are the block's own bytes per
//! element (codes, scales, biases) times the elements kept.
use crate::calib::stats::{route, LayerStats, Route};
use crate::calib::CalibStats;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::linalg::{gram, WhitenedSvd};
use crate::merge::{self, GroupReport, LayerPlan, LayerReport, MergeOptions, NewExpert};
use crate::moe::proj::{Proj, ProjFfn};
use crate::moe::weights::{expert_params, matrix, vector};
use crate::moe::{Act, Detection, MoeBlock};
use crate::passes::allocate_ranks::{allocate_ranks, MatrixEnergies, Rank};
use crate::passes::base_delta::base_delta;
use crate::passes::merge_experts::{permute, ExpertParams};
use crate::passes::prune_neurons::{keep_neurons, neuron_scores};
use crate::passes::refit_down::refit_down;
use faer::Mat;
use ndarray::{Array1, Array2, Axis};
use rayon::prelude::*;
use serde::Serialize;

mod replan;
pub mod streamed;
pub use replan::{replan, LayerRecipe};
use replan::{Form, MergeSpec};

/// Relative ridge of the whitening Grams (`λ = REL · tr(G)/d`).
const WHITEN_RIDGE: f64 = 1e-3;
/// Relative ridge of the least-squares refits toward the previous weights.
const REFIT_RIDGE: f64 = 1e-2;
/// Calibration rows per expert used to measure errors (from its reservoir).
const EVAL_ROWS: usize = 256;
/// Byte fractions of a layer the auto planner tries.
const GRID: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// Which compression family (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Measure every family per layer (merging included) and pick by error per byte.
    Auto,
    /// Activation-aware low rank, global rank allocation.
    LowRank,
    /// Shared base + activation-aware low-rank deltas.
    BaseDelta,
    /// Intermediate-neuron pruning with a least-squares refit of down.
    Neurons,
    /// No compression (merging alone must meet the budget).
    None,
}

/// The byte budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetSize {
    /// A fraction of the chosen layers' routed-expert bytes.
    Fraction(f64),
    /// Bytes of routed experts in the chosen layers.
    Bytes(u64),
}

/// Options of a compression run.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// The family.
    pub family: Family,
    /// The budget.
    pub target: TargetSize,
    /// Merge first with these options (`--keep`/`--experts`); the auto planner may merge
    /// on its own without them.
    pub merge: Option<MergeOptions>,
    /// MoE layers to compress (all when `None`).
    pub layers: Option<Vec<usize>>,
    /// Progress bar over layers.
    pub progress: bool,
    /// Per chosen layer, how much its calibrated error moves the model's output end to end
    /// (measured by the caller); the auto planner then also weighs layers by it.
    pub layer_weights: Option<Vec<f64>>,
}

/// One stored matrix of a compressed layer.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct MatrixReport {
    /// Router experts the matrix serves.
    pub experts: Vec<usize>,
    /// `gate`, `up` or `down`.
    pub matrix: String,
    /// `dense`, `low-rank` or `base+delta`.
    pub form: String,
    /// Rank of a factored matrix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Intermediate neurons kept (neuron pruning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neurons: Option<usize>,
    /// Bytes stored (f32: 4 per element; QMoE: the block's bytes per element).
    pub bytes: u64,
    /// Calibrated relative error of this matrix's outputs on its routed tokens
    /// (‖X·(W − Ŵ)ᵀ‖² / ‖X·Wᵀ‖², against the matrix it replaces).
    pub error: f64,
}

/// How one layer was compressed.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct LayerCompression {
    /// What was written: e.g. `low-rank`, `merge 4 + low-rank`, `neurons`, `dense`.
    pub family: String,
    /// Routed-expert bytes before (f32).
    pub bytes_before: u64,
    /// Routed-expert bytes after (shared bases included).
    pub bytes_after: u64,
    /// Calibrated relative squared error of the layer's routed output
    /// (Σ‖ŷ − y‖² / Σ‖y‖² over calibration tokens, routing weights included).
    pub error: f64,
    /// Routed multiply-adds per token before (top-k and usage aware).
    pub flops_before: f64,
    /// The same after.
    pub flops_after: f64,
    /// Every stored matrix.
    pub matrices: Vec<MatrixReport>,
}

/// The plan as a whole.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct CompressionSummary {
    /// The family asked for.
    pub family: Family,
    /// Which plan won (`auto`: `per-layer` or `global low-rank`).
    pub plan: String,
    /// Whether layers were fitted on the original's activations (`one-shot`) or layer by
    /// layer on the rewritten earlier layers' (`sequential`).
    pub pipeline: crate::sequential::Pipeline,
    /// Budget in bytes.
    pub budget_bytes: u64,
    /// Routed-expert bytes before, over the compressed layers.
    pub bytes_before: u64,
    /// After.
    pub bytes_after: u64,
    /// bytes_after / bytes_before.
    pub fraction: f64,
    /// Routed multiply-adds per token before (summed over layers).
    pub flops_before: f64,
    /// After.
    pub flops_after: f64,
    /// How the plan was chosen among the auto planner's alternatives (measured end to end
    /// on calibration samples), when there were several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_by: Option<Vec<AlternativeScore>>,
}

/// One alternative the auto planner measured end to end.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct AlternativeScore {
    /// The plan's name.
    pub plan: String,
    /// Its score on the selection samples (KL for language models, else relative L2).
    pub score: f64,
    /// What the score is.
    pub metric: String,
    /// Whether it was chosen.
    pub chosen: bool,
}

/// Everything a layer's candidates are measured and built with.
struct LayerData<'a> {
    block: &'a MoeBlock,
    stats: &'a LayerStats,
    act: Act,
    experts: Vec<ExpertParams>,
    /// Rows that fit (Grams, refits, neuron scores).
    fit: Rows,
    /// Rows that measure errors.
    eval: Rows,
    /// The original routed output on the evaluation rows, and Σ ω‖y‖².
    y: Array2<f32>,
    energy: f64,
    /// Per expert: Σ w² x xᵀ over its routed tokens (the input Gram gate/up are whitened by).
    in_gram: Vec<Mat<f64>>,
    /// Routed-expert elements of the layer (QMoE: its bytes in element-equivalents, see
    /// [`QCost`]).
    elements: usize,
    /// QMoE layers: the byte cost of their dense quantised experts.
    qcost: Option<QCost>,
    /// The layer's refitted m-smoe merges, by expert count (computed once).
    merges: std::sync::Mutex<std::collections::BTreeMap<usize, LayerPlan>>,
}

/// Calibration rows of a layer with their routing.
struct Rows {
    /// `[T, H]`.
    x: Array2<f32>,
    /// Importance weight of each row: the sum over rows estimates a sum over calibration
    /// tokens (each token sits in the reservoirs of its k experts).
    omega: Vec<f64>,
    routes: Vec<Route>,
    /// Per expert: the rows routed to it, and their weight `ω · w²` (routing weight squared).
    rows: Vec<Vec<usize>>,
    row_w: Vec<Vec<f64>>,
    /// Paired statistics (the sequential pipeline): the same tokens' rows in the original
    /// model, with their routing there. What the original block produced — the targets of
    /// refits and errors — is computed from these, so that a layer refitted on the rewritten
    /// earlier layers' activations maps them to the original layer's outputs.
    x_ref: Option<(Array2<f32>, Vec<Route>)>,
}

impl Rows {
    fn new(
        block: &MoeBlock,
        wr: &Array2<f32>,
        rb: Option<&Array1<f32>>,
        sb: Option<&[f32]>,
        per_expert: &[Vec<&[f32]>],
        per_expert_ref: Option<&[Vec<&[f32]>]>,
        counts: &[u64],
    ) -> Self {
        let n = block.router.num_experts;
        let h = block.hidden();
        let k = block.router.top_k as f64;
        let mut xs: Vec<f32> = Vec::new();
        let mut omega = Vec::new();
        for (e, res) in per_expert.iter().enumerate() {
            for r in res {
                xs.extend_from_slice(r);
                omega.push(counts[e] as f64 / res.len() as f64 / k);
            }
        }
        let x = Array2::from_shape_vec((omega.len(), h), xs).expect("rows of h");
        let mut logits = crate::linalg::mul_t(x.view(), wr.view());
        if let Some(b) = rb {
            logits += b;
        }
        let routes = route(block, sb, logits.view(), usize::MAX);
        let x_ref = per_expert_ref.map(|per| {
            let xs: Vec<f32> = per
                .iter()
                .flatten()
                .flat_map(|r| r.iter().copied())
                .collect();
            let xr = Array2::from_shape_vec((omega.len(), h), xs).expect("paired rows of h");
            let mut z = crate::linalg::mul_t(xr.view(), wr.view());
            if let Some(b) = rb {
                z += b;
            }
            let routes = route(block, sb, z.view(), usize::MAX);
            (xr, routes)
        });
        let mut rows = vec![Vec::new(); n];
        let mut row_w = vec![Vec::new(); n];
        for (tk, r) in routes.iter().enumerate() {
            for (slot, &e) in r.experts.iter().enumerate() {
                if r.kept[slot] {
                    rows[e].push(tk);
                    row_w[e].push(omega[tk] * f64::from(r.weights[slot]).powi(2));
                }
            }
        }
        Rows {
            x,
            omega,
            routes,
            rows,
            row_w,
            x_ref,
        }
    }

    /// The rows the original block's outputs (targets) are computed from.
    fn target_x(&self) -> &Array2<f32> {
        self.x_ref.as_ref().map_or(&self.x, |(x, _)| x)
    }
}

fn elements_of(p: &ExpertParams) -> usize {
    p.gate.as_ref().map_or(0, |g| g.len())
        + p.up.len()
        + p.down.len()
        + p.gate_bias.as_ref().map_or(0, |b| b.len())
        + p.up_bias.as_ref().map_or(0, |b| b.len())
        + p.down_bias.as_ref().map_or(0, |b| b.len())
}

fn bias_elements(p: &ExpertParams) -> usize {
    p.gate_bias.as_ref().map_or(0, |b| b.len())
        + p.up_bias.as_ref().map_or(0, |b| b.len())
        + p.down_bias.as_ref().map_or(0, |b| b.len())
}

impl<'a> LayerData<'a> {
    fn new(g: &Graph, block: &'a MoeBlock, stats: &'a LayerStats) -> Result<Self> {
        let n = block.router.num_experts;
        let h = block.hidden();
        let mut experts: Vec<Option<ExpertParams>> = vec![None; n];
        for e in &block.experts {
            experts[e.index] = Some(expert_params(g, &e.ffn)?);
        }
        let experts: Vec<ExpertParams> = experts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.ok_or_else(|| Error::Graph {
                    node: Some(block.name.clone()),
                    reason: format!("expert {i} is missing"),
                })
            })
            .collect::<Result<_>>()?;
        for (i, p) in experts.iter().enumerate() {
            let finite = |a: &Array2<f32>| a.iter().all(|v| v.is_finite());
            if !(finite(&p.up) && finite(&p.down) && p.gate.as_ref().is_none_or(finite)) {
                return Err(Error::Graph {
                    node: Some(block.name.clone()),
                    reason: format!("expert {i} has non-finite weights; nothing to compress"),
                });
            }
        }
        if stats.samples.iter().all(Vec::is_empty) {
            return Err(Error::Stats(format!(
                "{}: compression needs routed calibration samples (the statistics have none: \
                 --data-free or --reservoir 0); calibrate on data",
                block.name
            )));
        }
        for res in &stats.samples {
            if let Some(r) = res.iter().find(|r| r.len() != h) {
                return Err(Error::Stats(format!(
                    "{}: calibration samples have {} features, the block's hidden size is {h} \
                     (statistics of another model?)",
                    block.name,
                    r.len()
                )));
            }
        }
        let wr = Array2::from_shape_vec((n, h), matrix(g, &block.router.weight)?).map_err(|e| {
            Error::Tensor {
                tensor: block.router.weight.tensor.clone(),
                reason: e.to_string(),
            }
        })?;
        let rb = match &block.router.bias {
            Some(b) => Some(Array1::from(vector(g, b)?)),
            None => None,
        };
        // Every 4th reservoir row measures errors; the others fit (Grams, refits, scores), so
        // a refit is never judged on the rows it was fitted to.
        let split = |samples: &'a [Vec<Vec<f32>>], eval: bool| -> Vec<Vec<&'a [f32]>> {
            samples
                .iter()
                .map(|res| {
                    let few = res.len() < 4;
                    let v: Vec<&[f32]> = res
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| few || (i % 4 == 3) == eval)
                        .map(|(_, r)| r.as_slice())
                        .collect();
                    if eval {
                        v.into_iter().take(EVAL_ROWS).collect()
                    } else {
                        v
                    }
                })
                .collect()
        };
        let sb = crate::calib::stats::selection_bias(g, block)?;
        // Paired statistics: row for row the same tokens in the original model.
        let paired = stats.reference_samples.len() == n
            && stats
                .reference_samples
                .iter()
                .zip(&stats.samples)
                .all(|(r, s)| r.len() == s.len());
        let refs = |eval: bool| paired.then(|| split(&stats.reference_samples, eval));
        let fit = Rows::new(
            block,
            &wr,
            rb.as_ref(),
            sb.as_deref(),
            &split(&stats.samples, false),
            refs(false).as_deref(),
            &stats.counts,
        );
        let thin: Vec<usize> = (0..n)
            .filter(|&e| stats.samples[e].len() < h.min(256))
            .collect();
        if !thin.is_empty() {
            log::warn!(
                "{}: experts {thin:?} kept fewer routed calibration rows than min(hidden size, 256); \
                 calibrated errors will look smaller than they are (calibrate on more data, or \
                 raise --reservoir)",
                block.name
            );
        }
        let eval = Rows::new(
            block,
            &wr,
            rb.as_ref(),
            sb.as_deref(),
            &split(&stats.samples, true),
            refs(true).as_deref(),
            &stats.counts,
        );
        let act = block.experts[0].ffn.act;
        let in_gram: Vec<Mat<f64>> = (0..n)
            .map(|e| {
                let m = stats.input_moments.get(e).filter(|m| m.nrows() == h);
                let w2 = stats.mean_weight.get(e).copied().unwrap_or(1.0).powi(2);
                match m {
                    Some(m) => {
                        let s = stats.counts[e] as f64 * w2;
                        Mat::from_fn(h, h, |i, j| m[[i, j]] * s)
                    }
                    None => {
                        let xe = fit.x.select(Axis(0), &fit.rows[e]);
                        gram(xe.view(), Some(&fit.row_w[e]))
                    }
                }
            })
            .collect();
        let elements = experts.iter().map(elements_of).sum();
        let mut d = LayerData {
            block,
            stats,
            act,
            experts,
            fit,
            eval,
            y: Array2::zeros((0, 0)),
            energy: 0.0,
            in_gram,
            elements,
            qcost: None,
            merges: Default::default(),
        };
        // The original experts one at a time (not a second copy of the layer).
        let ids: Vec<Vec<usize>> = (0..d.experts.len()).map(|e| vec![e]).collect();
        let dense = |e: usize, xs: ndarray::ArrayView2<f32>| {
            ProjFfn::dense(d.experts[e].clone(), d.act).forward(xs, &[])
        };
        let (x, routes) = match &d.eval.x_ref {
            Some((x, routes)) => (x, routes),
            None => (&d.eval.x, &d.eval.routes),
        };
        let y = d.routed(&ids, &dense, x, routes);
        d.y = y;
        d.energy =
            d.y.rows()
                .into_iter()
                .zip(&d.eval.omega)
                .map(|(r, w)| w * r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>())
                .sum();
        Ok(d)
    }

    /// Every expert as its own dense target.
    fn identity(&self) -> LayerPlan {
        let n = self.experts.len();
        LayerPlan {
            block: self.block.name.clone(),
            experts: self
                .experts
                .iter()
                .enumerate()
                .map(|(i, p)| NewExpert {
                    ids: vec![i],
                    ffn: ProjFfn::dense(p.clone(), self.act),
                })
                .collect(),
            act: self.act,
            router_rows: None,
            bases: vec![],
            compress: None,
            report: LayerReport {
                block: self.block.name.clone(),
                experts_before: n,
                experts_after: n,
                method: None,
                grouping: None,
                align: None,
                groups: (0..n)
                    .map(|i| GroupReport {
                        expert: i,
                        members: vec![i],
                        frequencies: vec![self.stats.frequency[i]],
                    })
                    .collect(),
                dropped: vec![],
                alignment: None,
                compression: None,
            },
        }
    }

    /// The routed output `Σ_slots w · F_target(x)` on the evaluation rows.
    fn output(&self, experts: &[NewExpert], bases: &[Array2<f32>]) -> Array2<f32> {
        self.output_on(experts, bases, &self.eval.x, &self.eval.routes)
    }

    /// The routed output of `experts` on rows `x` routed by `routes`.
    fn output_on(
        &self,
        experts: &[NewExpert],
        bases: &[Array2<f32>],
        x: &Array2<f32>,
        routes: &[Route],
    ) -> Array2<f32> {
        let ids: Vec<Vec<usize>> = experts.iter().map(|t| t.ids.clone()).collect();
        let forward = |i: usize, xs: ndarray::ArrayView2<f32>| experts[i].ffn.forward(xs, bases);
        self.routed(&ids, &forward, x, routes)
    }

    /// The routed output of targets (`ids`: each target's experts; `forward(i, rows)`: target
    /// `i` on rows) on rows `x` routed by `routes`.
    fn routed(
        &self,
        ids: &[Vec<usize>],
        forward: &(dyn Fn(usize, ndarray::ArrayView2<f32>) -> Array2<f32> + Sync),
        x: &Array2<f32>,
        routes: &[Route],
    ) -> Array2<f32> {
        let n = self.experts.len();
        let mut lut = vec![usize::MAX; n];
        for (i, t) in ids.iter().enumerate() {
            for &e in t {
                lut[e] = i;
            }
        }
        let parts: Vec<(Vec<usize>, Array2<f32>)> = (0..ids.len())
            .into_par_iter()
            .map(|i| {
                let mut rows = Vec::new();
                let mut w = Vec::new();
                for (tk, r) in routes.iter().enumerate() {
                    let s: f32 = r
                        .experts
                        .iter()
                        .zip(&r.weights)
                        .filter(|(e, _)| lut[**e] == i)
                        .map(|(_, w)| *w)
                        .sum();
                    if s != 0.0 {
                        rows.push(tk);
                        w.push(s);
                    }
                }
                let xs = x.select(Axis(0), &rows);
                let mut o = forward(i, xs.view());
                for (mut row, s) in o.rows_mut().into_iter().zip(&w) {
                    row *= *s;
                }
                (rows, o)
            })
            .collect();
        let mut y = Array2::<f32>::zeros(x.raw_dim());
        for (rows, o) in parts {
            for (j, &tk) in rows.iter().enumerate() {
                let mut dst = y.row_mut(tk);
                dst += &o.row(j);
            }
        }
        y
    }

    /// Calibrated relative squared error of a layer form.
    fn error(&self, experts: &[NewExpert], bases: &[Array2<f32>]) -> f64 {
        let yh = self.output(experts, bases);
        let num: f64 = (&yh - &self.y)
            .rows()
            .into_iter()
            .zip(&self.eval.omega)
            .map(|(r, w)| w * r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>())
            .sum();
        num / self.energy.max(1e-30)
    }

    /// Fitting rows routed to any of `ids`, with their weights (ω·w² summed).
    fn target_rows(&self, ids: &[usize]) -> (Vec<usize>, Vec<f64>) {
        let mut acc: std::collections::BTreeMap<usize, f64> = Default::default();
        for &e in ids {
            for (&r, &w) in self.fit.rows[e].iter().zip(&self.fit.row_w[e]) {
                *acc.entry(r).or_default() += w;
            }
        }
        acc.into_iter().unzip()
    }

    /// The input Gram of a target (Σ over its members).
    fn target_gram(&self, ids: &[usize]) -> Mat<f64> {
        let mut g = self.in_gram[ids[0]].clone();
        for &e in &ids[1..] {
            g += &self.in_gram[e];
        }
        g
    }
}

/// Activation-aware spectra of one target's matrices: (matrix name, svd).
struct TargetSpectra {
    svds: Vec<(&'static str, WhitenedSvd)>,
}

/// The three (or two) matrices of `p` with their names.
fn mats(p: &ExpertParams) -> Vec<(&'static str, &Array2<f32>)> {
    let mut v = Vec::new();
    if let Some(g) = &p.gate {
        v.push(("gate", g));
    }
    v.push(("up", &p.up));
    v.push(("down", &p.down));
    v
}

/// Whitened SVDs of `w` (matrices of a target, or its deltas) under the target's Grams:
/// gate/up by the input Gram, down by the Gram of `hidden_of`'s intermediate activations.
fn spectra(
    d: &LayerData,
    ids: &[usize],
    ws: &[(&'static str, &Array2<f32>)],
    hidden_of: &ExpertParams,
) -> TargetSpectra {
    let g_in = d.target_gram(ids);
    let (rows, w) = d.target_rows(ids);
    let xs = d.fit.x.select(Axis(0), &rows);
    let h = ProjFfn::dense(hidden_of.clone(), d.act).hidden(xs.view(), &[]);
    let g_h = gram(h.view(), Some(&w));
    let svds = ws
        .iter()
        .map(|(name, m)| {
            let g = if *name == "down" { &g_h } else { &g_in };
            let svd = WhitenedSvd::new(m.view(), g.as_ref(), WHITEN_RIDGE).to_break_even();
            (*name, svd)
        })
        .collect();
    TargetSpectra { svds }
}

/// Per-type totals of a layer's spectra, for normalising energies.
fn type_totals(all: &[&TargetSpectra]) -> std::collections::BTreeMap<&'static str, f64> {
    let mut t = std::collections::BTreeMap::new();
    for s in all {
        for (name, svd) in &s.svds {
            *t.entry(*name).or_insert(0.0) += svd.sigma.iter().map(|v| v * v).sum::<f64>();
        }
    }
    t
}

fn energies(
    s: &TargetSpectra,
    ws: &[(&'static str, &Array2<f32>)],
    totals: &std::collections::BTreeMap<&'static str, f64>,
) -> Vec<MatrixEnergies> {
    s.svds
        .iter()
        .zip(ws)
        .map(|((name, svd), (_, m))| MatrixEnergies {
            out: m.nrows(),
            inp: m.ncols(),
            energy: svd.sigma.iter().map(|v| v * v).collect(),
            weight: 1.0 / totals.get(name).copied().unwrap_or(1.0).max(1e-300),
        })
        .collect()
}

fn rel_loss(e: &MatrixEnergies, r: Rank) -> f64 {
    let total: f64 = e.energy.iter().sum();
    if total > 0.0 {
        e.loss(r) / e.weight / total
    } else {
        0.0
    }
}

/// A layer's dense targets (identity or merged) with their matrices.
struct Targets {
    plan: LayerPlan,
    params: Vec<ExpertParams>,
    /// Spectra, computed once per set of targets.
    low_rank: std::sync::OnceLock<(Vec<TargetSpectra>, Vec<Vec<MatrixEnergies>>)>,
    base_delta: std::sync::OnceLock<BaseDeltaParts>,
}

impl Targets {
    /// The targets of `plan`, whose dense weights move into `params` (the plan keeps its
    /// experts' ids, biases and report; [`dense_built`] puts the weights back): one copy of
    /// the layer's weights rather than two.
    fn new(mut plan: LayerPlan) -> Self {
        let params = plan
            .experts
            .iter_mut()
            .map(|e| e.ffn.take_dense().expect("dense before compression"))
            .collect();
        Targets {
            plan,
            params,
            low_rank: Default::default(),
            base_delta: Default::default(),
        }
    }

    fn bias_elements(&self) -> usize {
        self.params.iter().map(bias_elements).sum()
    }

    fn dense_elements(&self) -> usize {
        self.params.iter().map(elements_of).sum()
    }
}

/// Factored forms of every target at the given ranks (one decision per matrix, in
/// target-major order): dense where the rank is `Dense`, else what `factor(target, matrix,
/// u, v)` makes of the rank-k factors.
fn build_factored(
    t: &Targets,
    spectra: &[TargetSpectra],
    en: &[Vec<MatrixEnergies>],
    ranks: &[Rank],
    factor: impl Fn(usize, &'static str, Array2<f32>, Array2<f32>) -> Proj,
) -> (Vec<NewExpert>, Vec<MatrixReport>) {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    let mut it = ranks.iter();
    for (i, ((e, p), (s, es))) in t
        .plan
        .experts
        .iter()
        .zip(&t.params)
        .zip(spectra.iter().zip(en))
        .enumerate()
    {
        let mut projs: Vec<Proj> = Vec::new();
        for (((name, svd), m), (_, w)) in s.svds.iter().zip(es).zip(mats(p)) {
            let r = *it.next().expect("one rank per matrix");
            let proj = match r {
                Rank::Dense => Proj::Dense(w.clone()),
                Rank::Factor(k) => {
                    let (u, v) = svd.factors(k);
                    factor(i, name, u, v)
                }
            };
            reports.push(MatrixReport {
                experts: e.ids.clone(),
                matrix: name.to_string(),
                form: proj.kind().into(),
                rank: proj.rank(),
                neurons: None,
                bytes: 4 * proj.stored() as u64,
                error: rel_loss(m, r),
            });
            projs.push(proj);
        }
        let down = projs.pop().expect("down");
        let up = projs.pop().expect("up");
        let gate = projs.pop();
        out.push(NewExpert {
            ids: e.ids.clone(),
            ffn: ProjFfn {
                gate,
                up,
                down,
                gate_bias: p.gate_bias.clone(),
                up_bias: p.up_bias.clone(),
                down_bias: p.down_bias.clone(),
                act: e.ffn.act,
                neurons: None,
            },
        });
    }
    (out, reports)
}

/// Low-rank forms of every target at the given ranks.
fn build_low_rank(
    t: &Targets,
    spectra: &[TargetSpectra],
    en: &[Vec<MatrixEnergies>],
    ranks: &[Rank],
) -> (Vec<NewExpert>, Vec<MatrixReport>) {
    build_factored(t, spectra, en, ranks, |_, _, u, v| Proj::LowRank { u, v })
}

/// Once gate/up are factored, the down projection sees approximate activations ĥ: refit it
/// by least squares so that ĥ·Wᵀ reproduces the expert's original outputs on the routed
/// fitting rows (toward the original down), then factor the refit at the rank the
/// allocation gave it, whitened by ĥ's Gram. Errors of gate/up are thus partly corrected
/// downstream instead of compounding.
fn refit_factored_down(
    d: &LayerData,
    t: &Targets,
    experts: &mut [NewExpert],
    reports: &mut [MatrixReport],
    bases: &[Array2<f32>],
) {
    let errors: Vec<Option<f64>> = experts
        .par_iter_mut()
        .zip(&t.params)
        .map(|(e, p)| {
            let dense = |q: &Proj| matches!(q, Proj::Dense(_));
            if dense(&e.ffn.up) && e.ffn.gate.as_ref().is_none_or(dense) {
                return None;
            }
            let (rows, w) = d.target_rows(&e.ids);
            if rows.len() < 2 {
                return None;
            }
            let xs = d.fit.x.select(Axis(0), &rows);
            let hh = e.ffn.hidden(xs.view(), bases);
            let xt = d.fit.target_x().select(Axis(0), &rows);
            let mut y = ProjFfn::dense(p.clone(), d.act).forward(xt.view(), &[]);
            if let Some(b) = &p.down_bias {
                y -= b;
            }
            let refit = refit_down(hh.view(), y.view(), p.down.view(), REFIT_RIDGE);
            match &e.ffn.down {
                Proj::Dense(_) => {
                    e.ffn.down = Proj::Dense(refit);
                    Some(0.0)
                }
                Proj::LowRank { u, .. } => {
                    let r = u.ncols();
                    let g = gram(hh.view(), Some(&w));
                    let svd = WhitenedSvd::new(refit.view(), g.as_ref(), WHITEN_RIDGE);
                    let (u, v) = svd.factors(r);
                    e.ffn.down = Proj::LowRank { u, v };
                    let total: f64 = svd.sigma.iter().map(|x| x * x).sum();
                    let lost: f64 = svd.sigma.iter().skip(r).map(|x| x * x).sum();
                    Some(if total > 0.0 { lost / total } else { 0.0 })
                }
                Proj::BaseDelta { base, u, .. } => {
                    let (base, r) = (*base, u.ncols());
                    if r == 0 {
                        return None;
                    }
                    let delta = &refit - &bases[base];
                    let g = gram(hh.view(), Some(&w));
                    let svd = WhitenedSvd::new(delta.view(), g.as_ref(), WHITEN_RIDGE);
                    let (u, v) = svd.factors(r);
                    e.ffn.down = Proj::BaseDelta { base, u, v };
                    let total: f64 = svd.sigma.iter().map(|x| x * x).sum();
                    let lost: f64 = svd.sigma.iter().skip(r).map(|x| x * x).sum();
                    Some(if total > 0.0 { lost / total } else { 0.0 })
                }
            }
        })
        .collect();
    for (e, err) in experts.iter().zip(errors) {
        if let Some(err) = err {
            for r in reports
                .iter_mut()
                .filter(|r| r.experts == e.ids && r.matrix == "down")
            {
                r.error = err;
            }
        }
    }
}

/// Spectra of all targets of a layer (in parallel over targets).
fn target_spectra(d: &LayerData, t: &Targets) -> (Vec<TargetSpectra>, Vec<Vec<MatrixEnergies>>) {
    let ws: Vec<Vec<(&'static str, &Array2<f32>)>> = t.params.iter().map(mats).collect();
    spectra_of(d, t, &ws)
}

/// Spectra of matrices `ws` (per target: named matrices, the targets' own or their deltas)
/// in parallel over targets, and their energies normalised per matrix type across targets.
fn spectra_of(
    d: &LayerData,
    t: &Targets,
    ws: &[Vec<(&'static str, &Array2<f32>)>],
) -> (Vec<TargetSpectra>, Vec<Vec<MatrixEnergies>>) {
    let spectra: Vec<TargetSpectra> = t
        .plan
        .experts
        .par_iter()
        .zip(&t.params)
        .zip(ws)
        .map(|((e, p), w)| spectra(d, &e.ids, w, p))
        .collect();
    let refs: Vec<&TargetSpectra> = spectra.iter().collect();
    let totals = type_totals(&refs);
    let en = spectra
        .iter()
        .zip(ws)
        .map(|(s, w)| energies(s, w, &totals))
        .collect();
    (spectra, en)
}

/// Base + delta material of a layer: the base, the deltas' spectra and energies.
struct BaseDeltaParts {
    /// One base per group of targets.
    bases: Vec<ExpertParams>,
    /// The group (base) of each target.
    group: Vec<usize>,
    spectra: Vec<TargetSpectra>,
    en: Vec<Vec<MatrixEnergies>>,
}

/// Base + delta material of a layer's targets: one base per group (`labels`: a group label
/// per target; None: one base for the layer).
fn base_delta_parts(d: &LayerData, t: &Targets, labels: Option<&[usize]>) -> BaseDeltaParts {
    let n = t.params.len();
    let labels: Vec<usize> = labels.map_or(vec![0; n], <[usize]>::to_vec);
    let mut names: Vec<usize> = labels.clone();
    names.sort_unstable();
    names.dedup();
    let group: Vec<usize> = labels
        .iter()
        .map(|l| names.binary_search(l).expect("own label"))
        .collect();
    let mut bases = Vec::new();
    let mut deltas: Vec<Option<DeltaMats>> = vec![None; n];
    for g in 0..names.len() {
        let members: Vec<usize> = (0..n).filter(|&i| group[i] == g).collect();
        let refs: Vec<&ExpertParams> = members.iter().map(|&i| &t.params[i]).collect();
        let w: Vec<f64> = members
            .iter()
            .map(|&i| {
                t.plan.experts[i]
                    .ids
                    .iter()
                    .map(|&e| d.stats.frequency[e])
                    .sum()
            })
            .collect();
        let (base, ds) = base_delta(&refs, &w);
        bases.push(base);
        for (&i, dm) in members.iter().zip(ds) {
            deltas[i] = Some(dm);
        }
    }
    let deltas: Vec<Vec<(&'static str, Array2<f32>)>> = deltas
        .into_iter()
        .map(|dm| {
            let (g, u, dn) = dm.expect("every target in a group");
            let mut v = Vec::new();
            if let Some(g) = g {
                v.push(("gate", g));
            }
            v.push(("up", u));
            v.push(("down", dn));
            v
        })
        .collect();
    let refs: Vec<Vec<(&'static str, &Array2<f32>)>> = deltas
        .iter()
        .map(|v| v.iter().map(|(n, m)| (*n, m)).collect())
        .collect();
    let (spectra, en) = spectra_of(d, t, &refs);
    BaseDeltaParts {
        bases,
        group,
        spectra,
        en,
    }
}

/// One target's delta matrices (gate, up, down).
type DeltaMats = (Option<Array2<f32>>, Array2<f32>, Array2<f32>);

/// Elements of every base of `parts`.
fn bases_elements(parts: &BaseDeltaParts) -> usize {
    parts.bases.iter().map(base_elements).sum()
}

fn base_elements(b: &ExpertParams) -> usize {
    b.gate.as_ref().map_or(0, |g| g.len()) + b.up.len() + b.down.len()
}

/// Builds base + delta forms; base matrices go to `bases` (indices offset by `bases.len()`).
fn build_base_delta(
    t: &Targets,
    parts: &BaseDeltaParts,
    ranks: &[Rank],
    bases: &mut Vec<Array2<f32>>,
) -> (Vec<NewExpert>, Vec<MatrixReport>) {
    let mut index: Vec<std::collections::BTreeMap<&'static str, usize>> = Vec::new();
    for b in &parts.bases {
        let mut ix = std::collections::BTreeMap::new();
        for (name, m) in mats(b) {
            ix.insert(name, bases.len());
            bases.push(m.clone());
        }
        index.push(ix);
    }
    let (out, mut reports) =
        build_factored(t, &parts.spectra, &parts.en, ranks, |i, name, u, v| {
            Proj::BaseDelta {
                base: index[parts.group[i]][name],
                u,
                v,
            }
        });
    for (g, b) in parts.bases.iter().enumerate() {
        let members: Vec<usize> = t
            .plan
            .experts
            .iter()
            .zip(&parts.group)
            .filter(|(_, &x)| x == g)
            .flat_map(|(e, _)| e.ids.clone())
            .collect();
        for (name, m) in mats(b) {
            reports.push(MatrixReport {
                experts: members.clone(),
                matrix: format!("{name} (shared base)"),
                form: "dense".into(),
                rank: None,
                neurons: None,
                bytes: 4 * m.len() as u64,
                error: 0.0,
            });
        }
    }
    (out, reports)
}

/// Neuron pruning of every target to `keep` neurons, with the down refit.
fn build_neurons(d: &LayerData, t: &Targets, keep: usize) -> (Vec<NewExpert>, Vec<MatrixReport>) {
    let built: Vec<(NewExpert, Vec<MatrixReport>)> = t
        .plan
        .experts
        .par_iter()
        .zip(&t.params)
        .map(|(e, p)| {
            let (rows, _) = d.target_rows(&e.ids);
            let xs = d.fit.x.select(Axis(0), &rows);
            let dense = ProjFfn::dense(p.clone(), d.act);
            let h = dense.hidden(xs.view(), &[]);
            let scores = neuron_scores(h.view(), p.down.view());
            let kept = keep_neurons(&scores, keep);
            let mut q = permute(p, &kept);
            let hk = h.select(Axis(1), &kept);
            let xt = d.fit.target_x().select(Axis(0), &rows);
            let full = dense.forward(xt.view(), &[]);
            let mut target = full.clone();
            if let Some(b) = &p.down_bias {
                target -= b;
            }
            q.down = refit_down(hk.view(), target.view(), q.down.view(), REFIT_RIDGE);
            let i = p.up.nrows();
            let mut f = ProjFfn::dense(q, d.act);
            f.neurons = Some(kept.clone());
            let approx = f.forward(xs.view(), &[]);
            let num: f64 = (&approx - &full)
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum();
            let den: f64 = full.iter().map(|v| f64::from(*v).powi(2)).sum();
            let err = if den > 0.0 { num / den } else { 0.0 };
            let reports = f
                .projs()
                .iter()
                .map(|(name, pr)| MatrixReport {
                    experts: e.ids.clone(),
                    matrix: name.to_string(),
                    form: "dense".into(),
                    rank: None,
                    neurons: Some(kept.len()),
                    bytes: 4 * pr.stored() as u64,
                    error: if i == kept.len() { 0.0 } else { err },
                })
                .collect();
            (
                NewExpert {
                    ids: e.ids.clone(),
                    ffn: f,
                },
                reports,
            )
        })
        .collect();
    let mut experts = Vec::new();
    let mut reports = Vec::new();
    for (e, r) in built {
        experts.push(e);
        reports.extend(r);
    }
    (experts, reports)
}

/// Refits every merged target's down projection to the routing-weighted outputs of its
/// members (singleton targets are left as they are: already exact).
fn refit_merged(d: &LayerData, plan: &mut LayerPlan) {
    let n = d.experts.len();
    let originals: Vec<ProjFfn> = d
        .experts
        .iter()
        .map(|p| ProjFfn::dense(p.clone(), d.act))
        .collect();
    let refits: Vec<Option<Array2<f32>>> = plan
        .experts
        .par_iter()
        .map(|t| {
            if t.ids.len() < 2 {
                return None;
            }
            let p = t.ffn.as_dense()?;
            let mut member = vec![false; n];
            t.ids.iter().for_each(|&i| member[i] = true);
            let (rows, _) = d.target_rows(&t.ids);
            let xs = d.fit.x.select(Axis(0), &rows);
            let h = t.ffn.hidden(xs.view(), &[]);
            let mut a = h;
            let mut target = Array2::<f32>::zeros((rows.len(), p.down.nrows()));
            let xt = d.fit.target_x().select(Axis(0), &rows);
            let outs: Vec<(usize, Array2<f32>)> = t
                .ids
                .iter()
                .map(|&e| (e, originals[e].forward(xt.view(), &[])))
                .collect();
            for (j, &tk) in rows.iter().enumerate() {
                let r = &d.fit.routes[tk];
                let mut s = 0f32;
                for (slot, &e) in r.experts.iter().enumerate() {
                    if member[e] && r.kept[slot] {
                        let w = r.weights[slot];
                        s += w;
                        let o = &outs.iter().find(|(i, _)| *i == e).expect("member").1;
                        let mut dst = target.row_mut(j);
                        dst.scaled_add(w, &o.row(j));
                    }
                }
                if let Some(b) = &p.down_bias {
                    let mut dst = target.row_mut(j);
                    dst.scaled_add(-s, b);
                }
                let mut ar = a.row_mut(j);
                ar *= s;
            }
            Some(refit_down(
                a.view(),
                target.view(),
                p.down.view(),
                REFIT_RIDGE,
            ))
        })
        .collect();
    for (t, r) in plan.experts.iter_mut().zip(refits) {
        if let Some(down) = r {
            t.ffn.down = Proj::Dense(down);
        }
    }
}

/// One way to write a layer, measured.
#[derive(Clone, Debug)]
struct Candidate {
    /// Elements stored.
    elements: usize,
    /// Calibrated relative error.
    error: f64,
    recipe: Recipe,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Recipe {
    Dense,
    /// Merge to m experts (refitted), then optionally a family at an element budget.
    Merge(usize, Option<(Family, usize)>),
    /// A family on the unmerged experts at an element budget.
    Family(Family, usize),
    /// Base + delta with one base per m-smoe group of `m`, at an element budget.
    GroupBase(usize, usize),
}

/// Which recipes a restricted per-layer choice may use.
type RecipeFilter = fn(&Recipe) -> bool;

/// A built layer form.
struct Built {
    experts: Vec<NewExpert>,
    bases: Vec<Array2<f32>>,
    matrices: Vec<MatrixReport>,
    merged: Option<LayerPlan>,
    family: String,
}

fn stored_elements(d: &LayerData, b: &Built) -> usize {
    match &d.qcost {
        Some(q) => b.experts.iter().map(|e| q.cost(e.ffn.intermediate())).sum(),
        None => {
            b.experts.iter().map(|e| e.ffn.stored()).sum::<usize>()
                + b.bases.iter().map(Array2::len).sum::<usize>()
        }
    }
}

/// The bytes of one dense QMoE expert as the emitter writes it (codes, scales, biases), in
/// element-equivalents of `bpe` bytes (the plan's bytes per element), so that QMoE budgets are
/// byte budgets.
#[derive(Debug, Clone)]
struct QCost {
    quant: [crate::moe::quant::Quant; 2],
    hidden: usize,
    gated: bool,
    fc1_bias: bool,
    fc2_bias: bool,
    /// Bytes of a scale (and a bias).
    scale_bytes: f64,
    /// Bytes per element-equivalent.
    bpe: f64,
}

impl QCost {
    fn new(g: &Graph, block: &MoeBlock) -> Option<Self> {
        let [q1, q2] = block.quant()?;
        let f = &block.experts.first()?.ffn;
        let sdt = crate::moe::consts::const_proto(g, &q1.scales).and_then(|t| t.data_type)?;
        Some(QCost {
            quant: [q1.clone(), q2.clone()],
            hidden: block.hidden(),
            gated: f.gate.is_some(),
            fc1_bias: f.up_bias.is_some() || f.gate_bias.is_some(),
            fc2_bias: f.down_bias.is_some(),
            scale_bytes: crate::onnx::dtype::bits(sdt).unwrap_or(32) as f64 / 8.0,
            bpe: 1.0,
        })
    }

    /// Bytes of an expert with `k` intermediate neurons (padded to even for 4-bit down codes).
    fn bytes(&self, k: usize) -> f64 {
        let [q1, q2] = &self.quant;
        let k = if q2.pack() > 1 { k.div_ceil(2) * 2 } else { k };
        let h = self.hidden;
        let rows1 = if self.gated { 2 * k } else { k };
        let codes = (rows1 * h) as f64 * f64::from(q1.bits) / 8.0
            + (h * k) as f64 * f64::from(q2.bits) / 8.0;
        let scales = (rows1 * q1.blocks(h) + h * q2.blocks(k)) as f64;
        let biases =
            (if self.fc1_bias { rows1 } else { 0 } + if self.fc2_bias { h } else { 0 }) as f64;
        codes + (scales + biases) * self.scale_bytes
    }

    /// [`Self::bytes`] in element-equivalents (rounded up).
    fn cost(&self, k: usize) -> usize {
        (self.bytes(k) / self.bpe).ceil() as usize
    }
}

/// The cost of `t`'s targets stored dense: elements, or QMoE element-equivalents.
fn dense_cost(d: &LayerData, t: &Targets) -> usize {
    match &d.qcost {
        Some(q) => t.params.iter().map(|p| q.cost(p.up.nrows())).sum(),
        None => t.dense_elements(),
    }
}

/// Applies `family` to `t` at `budget` elements (biases included).
fn apply_family(d: &LayerData, t: &Targets, family: Family, budget: usize) -> Option<Built> {
    if budget >= dense_cost(d, t) && family != Family::None {
        // Everything fits: the experts as they are (exact).
        return Some(dense_built(t, family_name(family).into()));
    }
    let fixed = t.bias_elements();
    let avail = budget.checked_sub(fixed)?;
    match family {
        Family::LowRank => {
            let (spectra, en) = t.low_rank.get_or_init(|| target_spectra(d, t));
            let flat: Vec<MatrixEnergies> = en.iter().flatten().cloned().collect();
            let (ranks, _) = allocate_ranks(&flat, avail);
            let (mut experts, mut matrices) = build_low_rank(t, spectra, en, &ranks);
            refit_factored_down(d, t, &mut experts, &mut matrices, &[]);
            Some(Built {
                experts,
                bases: vec![],
                matrices,
                merged: None,
                family: "low-rank".into(),
            })
        }
        Family::BaseDelta => {
            let parts = t.base_delta.get_or_init(|| base_delta_parts(d, t, None));
            apply_base_delta(d, t, parts, avail)
        }
        Family::Neurons => {
            let per_neuron: usize = t
                .params
                .iter()
                .map(|p| {
                    p.gate.as_ref().map_or(0, |g| g.ncols())
                        + p.up.ncols()
                        + p.down.nrows()
                        + usize::from(p.gate_bias.is_some())
                        + usize::from(p.up_bias.is_some())
                })
                .sum();
            let down_bias: usize = t
                .params
                .iter()
                .map(|p| p.down_bias.as_ref().map_or(0, |b| b.len()))
                .sum();
            let full = t.params[0].up.nrows();
            let keep = match &d.qcost {
                // The most neurons whose written QMoE bytes fit.
                Some(q) => (1..=full)
                    .rev()
                    .find(|&k| t.params.len() * q.cost(k) <= budget)
                    .unwrap_or(0),
                None => budget.checked_sub(down_bias)? / per_neuron.max(1),
            };
            if keep == 0 {
                return None;
            }
            let keep = keep.min(full);
            let (experts, matrices) = build_neurons(d, t, keep);
            Some(Built {
                experts,
                bases: vec![],
                matrices,
                merged: None,
                family: "neurons".into(),
            })
        }
        Family::Auto | Family::None => None,
    }
}

/// Base + delta forms from `parts` in `avail` elements (biases already taken off).
fn apply_base_delta(
    d: &LayerData,
    t: &Targets,
    parts: &BaseDeltaParts,
    avail: usize,
) -> Option<Built> {
    let avail = avail.checked_sub(bases_elements(parts))?;
    let flat: Vec<MatrixEnergies> = parts.en.iter().flatten().cloned().collect();
    let (ranks, _) = allocate_ranks(&flat, avail);
    let mut bases = vec![];
    let (mut experts, mut matrices) = build_base_delta(t, parts, &ranks, &mut bases);
    refit_factored_down(d, t, &mut experts, &mut matrices, &bases);
    let family = if parts.bases.len() > 1 {
        format!("base-delta ({} bases)", parts.bases.len())
    } else {
        "base-delta".into()
    };
    Some(Built {
        experts,
        bases,
        matrices,
        merged: None,
        family,
    })
}

/// Group labels (the dominant expert of each) for `m` bases over a layer's own experts:
/// m-smoe's grouping by router-logit similarity.
fn base_groups(d: &LayerData, m: usize) -> Vec<usize> {
    use crate::passes::group_experts::{group_experts, logit_similarity};
    group_experts(
        &d.stats.frequency,
        &logit_similarity(&d.stats.logit_cosine),
        m,
    )
}

fn dense_built(t: &Targets, family: String) -> Built {
    let experts: Vec<NewExpert> = t
        .plan
        .experts
        .iter()
        .zip(&t.params)
        .map(|(e, p)| NewExpert {
            ids: e.ids.clone(),
            ffn: e.ffn.with_dense(p),
        })
        .collect();
    let matrices = experts
        .iter()
        .flat_map(|e| {
            e.ffn.projs().into_iter().map(|(name, p)| MatrixReport {
                experts: e.ids.clone(),
                matrix: name.to_string(),
                form: "dense".into(),
                rank: None,
                neurons: None,
                bytes: 4 * p.stored() as u64,
                error: 0.0,
            })
        })
        .collect();
    Built {
        experts,
        bases: vec![],
        matrices,
        merged: None,
        family,
    }
}

/// Merge options the auto planner uses for its own merges (m-smoe).
fn auto_merge_options(layers: Option<Vec<usize>>) -> MergeOptions {
    MergeOptions {
        method: merge::MergeMethod::MSmoe,
        align: None,
        grouping: None,
        budget: merge::Budget::Keep(1.0),
        layers,
        progress: false,
    }
}

/// The layer merged to `m` experts (m-smoe, refitted); computed once per `m` (alignment is
/// the expensive part) and reused by every candidate and the final build.
fn merged_targets(g: &Graph, d: &LayerData, m: usize, opts: &MergeOptions) -> Result<Targets> {
    if let Some(p) = d.merges.lock().ok().and_then(|c| c.get(&m).cloned()) {
        return Ok(Targets::new(p));
    }
    let mut plan = merge::plan_layer(g, d.block, d.stats, m, opts)?;
    refit_merged(d, &mut plan);
    if let Ok(mut c) = d.merges.lock() {
        c.insert(m, plan.clone());
    }
    Ok(Targets::new(plan))
}

/// Builds `recipe` for layer `d`.
fn build(g: &Graph, d: &LayerData, recipe: Recipe, mopts: &MergeOptions) -> Result<Option<Built>> {
    Ok(match recipe {
        Recipe::Dense => Some(dense_built(&Targets::new(d.identity()), "dense".into())),
        Recipe::Family(f, b) => apply_family(d, &Targets::new(d.identity()), f, b),
        Recipe::GroupBase(m, b) => {
            let t = Targets::new(d.identity());
            let parts = base_delta_parts(d, &t, Some(&base_groups(d, m)));
            let avail = b.checked_sub(t.bias_elements());
            avail.and_then(|a| apply_base_delta(d, &t, &parts, a))
        }
        Recipe::Merge(m, then) => {
            let t = merged_targets(g, d, m, mopts)?;
            let name = format!("merge {m}");
            let mut b = match then {
                None => Some(dense_built(&t, name.clone())),
                Some((f, budget)) => apply_family(d, &t, f, budget).map(|mut b| {
                    b.family = format!("{name} + {}", b.family);
                    b
                }),
            };
            if let Some(b) = &mut b {
                b.merged = Some(t.plan);
            }
            b
        }
    })
}

/// The candidates of one layer for the auto planner (measured). Spectra are computed once
/// per set of targets (unmerged, and each merge); each grid point only re-allocates ranks
/// and measures.
fn layer_candidates(g: &Graph, d: &LayerData, families: &[Family]) -> Result<Vec<Candidate>> {
    let total = d.elements;
    let mut out = vec![Candidate {
        elements: total,
        error: 0.0,
        recipe: Recipe::Dense,
    }];
    let push = |b: Option<Built>, recipe: Recipe, out: &mut Vec<Candidate>| {
        if let Some(b) = b {
            out.push(Candidate {
                elements: stored_elements(d, &b),
                error: d.error(&b.experts, &b.bases),
                recipe,
            });
        }
    };
    let ident = Targets::new(d.identity());
    for &f in families {
        for &frac in GRID {
            let b = (frac * total as f64) as usize;
            push(
                apply_family(d, &ident, f, b),
                Recipe::Family(f, b),
                &mut out,
            );
        }
    }
    let n = d.experts.len();
    if families.contains(&Family::BaseDelta) {
        let mut gs: Vec<usize> = [0.5, 0.25]
            .iter()
            .map(|f| ((f * n as f64).round() as usize).max(2))
            .filter(|&m| m < n)
            .collect();
        gs.dedup();
        for m in gs {
            let parts = base_delta_parts(d, &ident, Some(&base_groups(d, m)));
            for &frac in GRID {
                let b = (frac * total as f64) as usize;
                let built = b
                    .checked_sub(ident.bias_elements())
                    .and_then(|a| apply_base_delta(d, &ident, &parts, a));
                push(built, Recipe::GroupBase(m, b), &mut out);
            }
        }
    }
    let mut ms: Vec<usize> = [0.75, 0.5, 0.25]
        .iter()
        .map(|f| ((f * n as f64).round() as usize).max(1))
        .filter(|&m| m < n)
        .collect();
    ms.dedup();
    for m in ms {
        let t = merged_targets(g, d, m, &auto_merge_options(None))?;
        push(
            Some(dense_built(&t, String::new())),
            Recipe::Merge(m, None),
            &mut out,
        );
        // Merged experts are then factored, or, where factors cannot be stored (QMoE),
        // pruned to fewer neurons.
        let then = if families.contains(&Family::LowRank) {
            Family::LowRank
        } else {
            Family::Neurons
        };
        for &frac in GRID {
            let b = (frac * total as f64) as usize;
            if (b as f64) < (m as f64 / n as f64) * total as f64 {
                push(
                    apply_family(d, &t, then, b),
                    Recipe::Merge(m, Some((then, b))),
                    &mut out,
                );
            }
        }
    }
    out.retain(|c| c.error.is_finite());
    Ok(out)
}

/// Picks one candidate per layer minimising the summed error within `budget` elements:
/// start from each layer's cheapest candidate, then take upgrades along each layer's lower
/// convex hull by error saved per element while they fit; then any single upgrade that still
/// fits and lowers the error.
fn choose(cands: &[Vec<Candidate>], budget: usize) -> Option<Vec<usize>> {
    let mut pick: Vec<usize> = cands
        .iter()
        .map(|c| {
            (0..c.len())
                .min_by(|&a, &b| {
                    c[a].elements
                        .cmp(&c[b].elements)
                        .then(c[a].error.total_cmp(&c[b].error))
                })
                .expect("dense is always a candidate")
        })
        .collect();
    let mut used: usize = pick.iter().zip(cands).map(|(&p, c)| c[p].elements).sum();
    if used > budget {
        return None;
    }
    loop {
        // Best upgrade by error saved per extra element, over all layers.
        let mut best: Option<(f64, usize, usize)> = None;
        for (l, c) in cands.iter().enumerate() {
            let cur = &c[pick[l]];
            for (i, x) in c.iter().enumerate() {
                if x.elements <= cur.elements || x.error >= cur.error {
                    continue;
                }
                let extra = x.elements - cur.elements;
                if used + extra > budget {
                    continue;
                }
                let ratio = (cur.error - x.error) / extra as f64;
                if best.is_none_or(|(r, bl, bi)| ratio > r || (ratio == r && (l, i) < (bl, bi))) {
                    best = Some((ratio, l, i));
                }
            }
        }
        let Some((_, l, i)) = best else { break };
        used = used - cands[l][pick[l]].elements + cands[l][i].elements;
        pick[l] = i;
    }
    Some(pick)
}

/// The chosen layers' data, and the plan's bytes per element.
///
/// QMoE blocks store dense quantised experts only: no factors, no shared bases. Their cost
/// is their bytes as written (codes, scales, biases) in element-equivalents of the plan's
/// bytes per element, so that the budget is a byte budget.
fn prepare<'a>(
    g: &Graph,
    det: &'a Detection,
    stats: &'a CalibStats,
    layers: Option<&[usize]>,
) -> Result<(Vec<LayerData<'a>>, f64)> {
    let chosen = merge::select_layers(g, det, stats, layers)?;
    let mut data: Vec<LayerData> = chosen
        .iter()
        .map(|(b, s)| LayerData::new(g, b, s))
        .collect::<Result<_>>()?;
    if !data.iter().any(|d| d.block.quant().is_some()) {
        return Ok((data, 4.0));
    }
    let elements: usize = data.iter().map(|d| d.elements).sum();
    let bpe = data
        .iter()
        .map(|d| d.block.expert_bytes as f64)
        .sum::<f64>()
        / elements.max(1) as f64;
    for d in &mut data {
        d.qcost = QCost::new(g, d.block).map(|q| QCost { bpe, ..q });
        if let Some(q) = &d.qcost {
            d.elements = d.experts.iter().map(|p| q.cost(p.up.nrows())).sum();
        }
    }
    Ok((data, bpe))
}

/// [`prepare`] for the one identified block named `block` (`what`: what is done with it, for
/// the error).
fn prepare_one<'a>(
    g: &Graph,
    det: &'a Detection,
    stats: &'a CalibStats,
    block: &str,
    what: &str,
) -> Result<(Vec<LayerData<'a>>, f64)> {
    let index = det
        .identified_blocks()
        .iter()
        .position(|b| b.name == block)
        .ok_or_else(|| Error::Graph {
            node: Some(block.to_string()),
            reason: format!("the block to {what} is not among the detected blocks"),
        })?;
    prepare(g, det, stats, Some(&[index]))
}

/// Plans the compression of every chosen layer: one plan for a fixed family; for `auto`,
/// several complete alternatives (the per-layer choice by calibrated error, and each family
/// on its own), which the caller measures end to end and picks from.
pub fn plan(
    g: &Graph,
    det: &Detection,
    stats: &CalibStats,
    opts: &CompressOptions,
) -> Result<Vec<Alternative>> {
    let bar = crate::progress::count_bar(opts.progress, 0, "layers");
    bar.set_message("preparing");
    let (data, bpe) = prepare(g, det, stats, opts.layers.as_deref())?;
    bar.set_length(data.len() as u64);
    let quantized = data.iter().any(|d| d.block.quant().is_some());
    let total: usize = data.iter().map(|d| d.elements).sum();
    if quantized && matches!(opts.family, Family::LowRank | Family::BaseDelta) {
        return Err(Error::Usage(format!(
            "--compress {}: the chosen layers are com.microsoft.QMoE, which stores dense \
             quantised experts only; use --compress neurons or auto (neuron pruning and merging)",
            family_name(opts.family)
        )));
    }
    let budget = match opts.target {
        TargetSize::Fraction(f) => (f * total as f64).floor() as usize,
        TargetSize::Bytes(b) => (b as f64 / bpe).floor() as usize,
    };
    // The fixed merge, when asked for.
    let fixed: Option<Vec<LayerPlan>> = match &opts.merge {
        Some(m) => {
            if m.method.prunes() {
                return Err(Error::Usage(
                    "--target-size compresses merged experts: use a merging method (m-smoe, \
                     hc-smoe, average) with --keep/--experts, or no --keep"
                        .into(),
                ));
            }
            let mut plans = merge::plan(g, det, stats, m)?;
            for (p, d) in plans.iter_mut().zip(&data) {
                refit_merged(d, p);
            }
            Some(plans)
        }
        None => None,
    };
    // Each layer's fixed merge, for the sequential pipeline's refits.
    let fixed_merge: Vec<Option<MergeSpec>> = match (&fixed, &opts.merge) {
        (Some(plans), Some(m)) => plans
            .iter()
            .map(|p| {
                Some(MergeSpec {
                    opts: m.clone(),
                    experts: p.experts.len(),
                    refit: true,
                })
            })
            .collect(),
        _ => vec![None; data.len()],
    };
    let targets: Vec<Targets> = match fixed {
        Some(plans) => plans.into_iter().map(Targets::new).collect(),
        None => data.iter().map(|d| Targets::new(d.identity())).collect(),
    };
    // Recipes of a plan that writes every layer in one form (after the fixed merge).
    let uniform =
        |builts: &[Built], form: &dyn Fn(&LayerData, &Built) -> Form| -> Vec<LayerRecipe> {
            data.iter()
                .zip(builts)
                .zip(&fixed_merge)
                .map(|((d, b), m)| LayerRecipe {
                    block: d.block.name.clone(),
                    merge: m.clone(),
                    form: form(d, b),
                })
                .collect()
        };
    let layer_fixed: Vec<usize> = targets.iter().map(Targets::bias_elements).collect();
    let merged_total: usize = data
        .iter()
        .zip(&targets)
        .map(|(d, t)| dense_cost(d, t))
        .sum();
    let alternatives: Vec<(Vec<Built>, String, Vec<LayerRecipe>)> = match opts.family {
        f if f != Family::None && budget >= merged_total => {
            let b: Vec<Built> = targets
                .iter()
                .map(|t| dense_built(t, "dense".into()))
                .collect();
            let r = uniform(&b, &|_, _| Form::Dense);
            vec![(b, "dense: everything fits the budget".into(), r)]
        }
        Family::None => {
            if merged_total > budget {
                return Err(Error::Usage(format!(
                    "--compress none: the merged experts take {} bytes, over the budget of {} \
                     (keep fewer experts, or let smoe-opt compress)",
                    4 * merged_total,
                    4 * budget
                )));
            }
            let b: Vec<Built> = targets
                .iter()
                .map(|t| dense_built(t, "merged".into()))
                .collect();
            let r = uniform(&b, &|_, _| Form::Dense);
            vec![(b, "merge only".into(), r)]
        }
        Family::LowRank | Family::BaseDelta => {
            bar.set_message("factoring");
            let b = global_factored(&data, &targets, opts.family, budget)?;
            let r = uniform(&b, &in_family(opts.family));
            vec![(
                b,
                format!("{}, global rank allocation", family_name(opts.family)),
                r,
            )]
        }
        Family::Neurons => {
            bar.set_message("pruning neurons");
            let b = uniform_neurons(&data, &targets, budget)?;
            let r = uniform(&b, &in_family(Family::Neurons));
            vec![(b, "neurons, one fraction for every layer".into(), r)]
        }
        Family::Auto => {
            let mut alts = Vec::new();
            if opts.merge.is_none() {
                bar.set_message("measuring candidates");
                let cands: Vec<Vec<Candidate>> = data
                    .iter()
                    .map(|d| {
                        let families: &[Family] = if quantized {
                            &[Family::Neurons]
                        } else {
                            &[Family::LowRank, Family::BaseDelta, Family::Neurons]
                        };
                        let c = layer_candidates(g, d, families);
                        bar.inc(1);
                        c
                    })
                    .collect::<Result<_>>()?;
                // The per-layer choice over every candidate, and restricted to each kind
                // (the summed layer errors are only a proxy: the end-to-end comparison
                // decides).
                let kinds: [(&str, RecipeFilter); 5] = [
                    ("every family and merging", |_| true),
                    ("shared bases", |r| {
                        matches!(
                            r,
                            Recipe::Dense
                                | Recipe::Family(Family::BaseDelta, _)
                                | Recipe::GroupBase(..)
                        )
                    }),
                    ("low rank", |r| {
                        matches!(r, Recipe::Dense | Recipe::Family(Family::LowRank, _))
                    }),
                    ("neurons", |r| {
                        matches!(r, Recipe::Dense | Recipe::Family(Family::Neurons, _))
                    }),
                    ("merging (+ low rank)", |r| {
                        matches!(r, Recipe::Dense | Recipe::Merge(..))
                    }),
                ];
                let mut seen = std::collections::BTreeSet::new();
                // With measured sensitivities, each choice is also made on layer errors
                // weighted by how much they move the model's output end to end.
                let weightings: Vec<(Option<&Vec<f64>>, &str)> = match &opts.layer_weights {
                    Some(w) if w.len() == data.len() => {
                        vec![(None, ""), (Some(w), ", layers weighted by sensitivity")]
                    }
                    _ => vec![(None, "")],
                };
                let runs: Vec<(&str, RecipeFilter, Option<&Vec<f64>>, &str)> = kinds
                    .iter()
                    .flat_map(|&(label, keep)| {
                        weightings.iter().map(move |&(w, wl)| (label, keep, w, wl))
                    })
                    .collect();
                for (label, keep, weights, wlabel) in runs {
                    let filtered: Vec<Vec<Candidate>> = cands
                        .iter()
                        .enumerate()
                        .map(|(l, c)| {
                            c.iter()
                                .filter(|x| keep(&x.recipe))
                                .cloned()
                                .map(|mut x| {
                                    x.error *= weights.map_or(1.0, |w| w[l]);
                                    x
                                })
                                .collect()
                        })
                        .collect();
                    let Some(pick) = choose(&filtered, budget) else {
                        continue;
                    };
                    let recipes: Vec<String> = pick
                        .iter()
                        .zip(&filtered)
                        .map(|(&p, c)| format!("{:?}", c[p].recipe))
                        .collect();
                    if !seen.insert(recipes) {
                        continue;
                    }
                    let mut out = Vec::new();
                    let mut recipes = Vec::new();
                    for ((d, c), &p) in data.iter().zip(&filtered).zip(&pick) {
                        recipes.push(auto_recipe(d, c[p].recipe));
                        out.push(
                            build(g, d, c[p].recipe, &auto_merge_options(None))?.ok_or_else(
                                || Error::Graph {
                                    node: Some(d.block.name.clone()),
                                    reason: "a measured candidate could not be rebuilt".into(),
                                },
                            )?,
                        );
                    }
                    alts.push((
                        out,
                        format!("per-layer choice ({label}{wlabel}) by calibrated error per byte"),
                        recipes,
                    ));
                }
                // MC-SMoE's merge at the budget (adaptive per-layer counts), refitted.
                for method in [merge::MergeMethod::MSmoe, merge::MergeMethod::HcSmoe] {
                    for refit in [true, false] {
                        if let Some(b) =
                            merge_at_budget(g, det, stats, &data, (method, refit), budget, opts)?
                        {
                            alts.push(b);
                        }
                    }
                }
            }
            let factored: &[Family] = if quantized {
                &[]
            } else {
                &[Family::LowRank, Family::BaseDelta]
            };
            for &f in factored {
                if let Ok(b) = global_factored(&data, &targets, f, budget) {
                    let r = uniform(&b, &in_family(f));
                    alts.push((b, format!("{}, global rank allocation", family_name(f)), r));
                }
            }
            if let Ok(b) = uniform_neurons(&data, &targets, budget) {
                let r = uniform(&b, &in_family(Family::Neurons));
                alts.push((b, "neurons, one fraction for every layer".into(), r));
            }
            if alts.is_empty() {
                return Err(Error::Usage(format!(
                    "a budget of {} bytes is below what any compression can store \
                     (biases alone take {})",
                    4 * budget,
                    4 * layer_fixed.iter().sum::<usize>()
                )));
            }
            alts
        }
    };
    bar.finish_and_clear();
    alternatives
        .into_iter()
        .map(|(mut builts, name, recipes)| {
            // Layers merged by the fixed merge say so, as the sequential refit's do.
            for (b, m) in builts.iter_mut().zip(&fixed_merge) {
                if let Some(m) = m.as_ref().filter(|_| !b.family.starts_with("merge ")) {
                    b.family = match b.family.as_str() {
                        "dense" | "merged" => format!("merge {}", m.experts),
                        f => format!("merge {} + {f}", m.experts),
                    };
                }
            }
            let mut a = finish(&data, &targets, builts, name, opts.family, budget, bpe)?;
            a.recipes = recipes;
            Ok(a)
        })
        .collect()
}

/// A layer's form in `family` at the elements its built form stores.
fn in_family(family: Family) -> impl Fn(&LayerData, &Built) -> Form {
    move |d, b| Form::Family(family, stored_elements(d, b))
}

/// The sequential pipeline's recipe of an auto planner candidate.
fn auto_recipe(d: &LayerData, r: Recipe) -> LayerRecipe {
    let (merge, form) = match r {
        Recipe::Dense => (None, Form::Dense),
        Recipe::Family(f, b) => (None, Form::Family(f, b)),
        Recipe::GroupBase(m, b) => (None, Form::GroupBase(m, b)),
        Recipe::Merge(m, then) => (
            Some(MergeSpec {
                opts: auto_merge_options(None),
                experts: m,
                refit: true,
            }),
            then.map_or(Form::Dense, |(f, b)| Form::Family(f, b)),
        ),
    };
    LayerRecipe {
        block: d.block.name.clone(),
        merge,
        form,
    }
}

/// A merge-only plan: the built layers, its description and its per-layer recipes.
type MergedPlan = (Vec<Built>, String, Vec<LayerRecipe>);

/// Merging alone to the largest expert count that fits `budget` (the method's own per-layer
/// counts), merged down projections refitted.
fn merge_at_budget(
    g: &Graph,
    det: &Detection,
    stats: &CalibStats,
    data: &[LayerData],
    (method, refit): (merge::MergeMethod, bool),
    budget: usize,
    opts: &CompressOptions,
) -> Result<Option<MergedPlan>> {
    let n_total: usize = data.iter().map(|d| d.experts.len()).sum();
    let total: usize = data.iter().map(|d| d.elements).sum();
    // Experts are the same size within a layer; keep the total count that fits.
    let per_expert = total as f64 / n_total.max(1) as f64;
    let keep = ((budget as f64 / per_expert).floor() as usize).min(n_total);
    if keep < data.len() {
        return Ok(None);
    }
    let mopts = MergeOptions {
        method,
        align: None,
        grouping: None,
        budget: merge::Budget::Experts(keep / data.len()),
        layers: opts.layers.clone(),
        progress: false,
    };
    let mut plans = merge::plan(g, det, stats, &mopts)?;
    let mut out = Vec::new();
    let mut recipes = Vec::new();
    for (p, d) in plans.iter_mut().zip(data) {
        recipes.push(LayerRecipe {
            block: d.block.name.clone(),
            merge: Some(MergeSpec {
                opts: mopts.clone(),
                experts: p.experts.len(),
                refit,
            }),
            form: Form::Dense,
        });
        if refit {
            refit_merged(d, p);
        }
        let t = Targets::new(p.clone());
        let mut b = dense_built(&t, format!("merge {}", p.experts.len()));
        b.merged = Some(t.plan);
        out.push(b);
    }
    if out
        .iter()
        .zip(data)
        .map(|(b, d)| stored_elements(d, b))
        .sum::<usize>()
        > budget
    {
        return Ok(None);
    }
    let name = match method {
        merge::MergeMethod::HcSmoe => "hc-smoe",
        _ => "m-smoe",
    };
    let how = if refit { "refitted" } else { "as merged" };
    Ok(Some((out, format!("{name} merge, {how}"), recipes)))
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Auto => "auto",
        Family::LowRank => "low-rank",
        Family::BaseDelta => "base-delta",
        Family::Neurons => "neurons",
        Family::None => "none",
    }
}

/// Neuron pruning at one keep fraction for every layer (the largest that fits).
fn uniform_neurons(data: &[LayerData], targets: &[Targets], budget: usize) -> Result<Vec<Built>> {
    let total: usize = data
        .iter()
        .zip(targets)
        .map(|(d, t)| dense_cost(d, t))
        .sum();
    let frac = budget as f64 / total.max(1) as f64;
    data.iter()
        .zip(targets)
        .map(|(d, t)| {
            let b = (frac * dense_cost(d, t) as f64) as usize;
            apply_family(d, t, Family::Neurons, b).ok_or_else(|| {
                Error::Usage(format!(
                    "{}: a budget of {} bytes leaves no neuron per expert",
                    d.block.name,
                    4 * b
                ))
            })
        })
        .collect()
}

/// One complete compression plan.
pub struct Alternative {
    /// Per layer.
    pub plans: Vec<LayerPlan>,
    /// How each layer is built again from other statistics (the sequential pipeline).
    pub recipes: Vec<LayerRecipe>,
    /// The summary.
    pub summary: CompressionSummary,
}

/// Layer plans and the summary of one set of built layers.
fn finish(
    data: &[LayerData],
    targets: &[Targets],
    builts: Vec<Built>,
    plan_name: String,
    family: Family,
    budget: usize,
    bpe: f64,
) -> Result<Alternative> {
    let bytes = |elements: usize| (elements as f64 * bpe).round() as u64;
    let mut plans = Vec::new();
    let (mut bytes_before, mut bytes_after, mut flops_before, mut flops_after) =
        (0u64, 0u64, 0.0, 0.0);
    for ((d, t), mut b) in data.iter().zip(targets).zip(builts) {
        let elements = stored_elements(d, &b);
        let merged = b.merged.take();
        let base = merged.as_ref().unwrap_or(&t.plan);
        let fb = dense_flops(d);
        let fa = flops(d, &b.experts);
        let comp = LayerCompression {
            family: b.family.clone(),
            bytes_before: bytes(d.elements),
            bytes_after: bytes(elements),
            error: d.error(&b.experts, &b.bases),
            flops_before: fb,
            flops_after: fa,
            matrices: b
                .matrices
                .into_iter()
                .map(|mut m| {
                    m.bytes = bytes(m.bytes as usize / 4);
                    m
                })
                .collect(),
        };
        bytes_before += comp.bytes_before;
        bytes_after += comp.bytes_after;
        flops_before += fb;
        flops_after += fa;
        let mut report = base.report.clone();
        report.experts_after = b.experts.len();
        plans.push(LayerPlan {
            block: base.block.clone(),
            experts: b.experts,
            act: base.act,
            router_rows: None,
            bases: b.bases,
            compress: Some(comp),
            report,
        });
    }
    if bytes_after > bytes(budget) + data.len() as u64 {
        return Err(Error::Graph {
            node: None,
            reason: format!(
                "internal: the plan stores {bytes_after} bytes, over the budget of {}",
                bytes(budget)
            ),
        });
    }
    Ok(Alternative {
        plans,
        recipes: vec![],
        summary: CompressionSummary {
            family,
            plan: plan_name,
            pipeline: crate::sequential::Pipeline::OneShot,
            budget_bytes: bytes(budget),
            bytes_before,
            bytes_after,
            fraction: bytes_after as f64 / bytes_before.max(1) as f64,
            flops_before,
            flops_after,
            chosen_by: None,
        },
    })
}

/// [`flops`] of the layer's own dense experts (one expert copied at a time).
fn dense_flops(d: &LayerData) -> f64 {
    let k = d.block.router.top_k as f64;
    d.experts
        .iter()
        .enumerate()
        .map(|(e, p)| k * d.stats.frequency[e] * ProjFfn::dense(p.clone(), d.act).flops() as f64)
        .sum()
}

/// Routed multiply-adds per token: `k · Σ_e f_e · flops(target of e)`.
fn flops(d: &LayerData, experts: &[NewExpert]) -> f64 {
    let k = d.block.router.top_k as f64;
    experts
        .iter()
        .map(|t| {
            let f: f64 = t.ids.iter().map(|&e| d.stats.frequency[e]).sum();
            k * f * t.ffn.flops() as f64
        })
        .sum()
}

/// The error for a budget of `budget` elements below what `family` (low rank or base +
/// delta) stores whatever the ranks.
fn below_factored(family: Family, budget: usize) -> Error {
    Error::Usage(format!(
        "a budget of {} bytes is below what {} can store",
        4 * budget,
        if family == Family::LowRank {
            "low rank (biases)"
        } else {
            "base + delta (biases and one base per layer)"
        }
    ))
}

/// Low-rank or base + delta with one rank allocation over every layer's matrices
/// (energies normalised per layer and matrix type).
fn global_factored(
    data: &[LayerData],
    targets: &[Targets],
    family: Family,
    budget: usize,
) -> Result<Vec<Built>> {
    if budget >= targets.iter().map(Targets::dense_elements).sum() {
        return Ok(targets
            .iter()
            .map(|t| dense_built(t, family_name(family).into()))
            .collect());
    }
    let fixed: usize = targets.iter().map(Targets::bias_elements).sum();
    let over = || below_factored(family, budget);
    let mut avail = budget.checked_sub(fixed).ok_or_else(over)?;
    if family == Family::LowRank {
        let parts: Vec<(Vec<TargetSpectra>, Vec<Vec<MatrixEnergies>>)> = data
            .iter()
            .zip(targets)
            .map(|(d, t)| target_spectra(d, t))
            .collect();
        let flat: Vec<MatrixEnergies> = parts
            .iter()
            .flat_map(|(_, en)| en.iter().flatten().cloned())
            .collect();
        let (ranks, _) = allocate_ranks(&flat, avail);
        let mut at = 0;
        Ok(parts
            .iter()
            .zip(targets)
            .zip(data)
            .map(|(((s, en), t), d)| {
                let k: usize = en.iter().map(Vec::len).sum();
                let (mut experts, mut matrices) = build_low_rank(t, s, en, &ranks[at..at + k]);
                refit_factored_down(d, t, &mut experts, &mut matrices, &[]);
                at += k;
                Built {
                    experts,
                    bases: vec![],
                    matrices,
                    merged: None,
                    family: "low-rank".into(),
                }
            })
            .collect())
    } else {
        let parts: Vec<BaseDeltaParts> = data
            .iter()
            .zip(targets)
            .map(|(d, t)| base_delta_parts(d, t, None))
            .collect();
        let bases: usize = parts.iter().map(bases_elements).sum();
        avail = avail.checked_sub(bases).ok_or_else(over)?;
        let flat: Vec<MatrixEnergies> = parts
            .iter()
            .flat_map(|p| p.en.iter().flatten().cloned())
            .collect();
        let (ranks, _) = allocate_ranks(&flat, avail);
        let mut at = 0;
        Ok(parts
            .iter()
            .zip(targets)
            .zip(data)
            .map(|((p, t), d)| {
                let k: usize = p.en.iter().map(Vec::len).sum();
                let mut bases = vec![];
                let (mut experts, mut matrices) =
                    build_base_delta(t, p, &ranks[at..at + k], &mut bases);
                refit_factored_down(d, t, &mut experts, &mut matrices, &bases);
                at += k;
                Built {
                    experts,
                    bases,
                    matrices,
                    merged: None,
                    family: "base-delta".into(),
                }
            })
            .collect())
    }
}

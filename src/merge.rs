//! The merging pipelines (`--method`): from calibration statistics to the merged (or pruned)
//! experts of every selected MoE layer, chaining the passes of `passes/`.
//!
//! - `m-smoe` (default, MC-SMoE's merge step): adaptive per-layer budget, dominant experts,
//!   grouping by router-logit similarity, weight-matching alignment (gated FFNs included),
//!   frequency-weighted merge.
//! - `hc-smoe`: uniform budget, average-linkage clustering of mean expert outputs, frequency-
//!   weighted merge, no alignment.
//! - `average`: as m-smoe's grouping, uniform average, no alignment.
//! - `prune-frequency` / `prune-reap`: keep the experts with the highest usage / REAP score and
//!   delete the others' router rows.
//!
//! The result ([`LayerPlan`]) holds the new experts' weights and which router experts each one
//! answers; `emit::rewrite` writes them.
use crate::calib::stats::LayerStats;
use crate::calib::CalibStats;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::moe::proj::ProjFfn;
use crate::moe::weights::expert_params;
use crate::moe::{Act, Detection, MoeBlock};
use crate::passes::align_experts::{activation_cost, align, distance, weight_cost, COST_BLOCK};
use crate::passes::cluster_outputs::cluster_outputs;
use crate::passes::group_experts::{group_experts, logit_similarity, weight_similarity};
use crate::passes::merge_experts::{merge_weighted, ExpertParams};
use crate::passes::plan_budget::plan_budget;
use crate::passes::prune_experts::prune_experts;
use ndarray::Array2;
use rayon::prelude::*;
use serde::Serialize;

pub mod streamed;

/// Memory that concurrent alignments may use for their similarity matrices (bytes).
const ALIGN_MEMORY: u64 = 4 << 30;

/// How experts are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MergeMethod {
    /// MC-SMoE's merge: router-logit groups, alignment, frequency-weighted average.
    MSmoe,
    /// HC-SMoE: clusters of mean expert outputs, frequency-weighted average.
    HcSmoe,
    /// Keep the most-used experts, delete the others' router rows.
    PruneFrequency,
    /// Keep the experts with the highest REAP score (routing weight × output norm).
    PruneReap,
    /// Uniform average of router-logit groups, no alignment.
    Average,
}

impl MergeMethod {
    /// Whether the method prunes (deletes router rows) rather than merges.
    pub fn prunes(self) -> bool {
        matches!(self, MergeMethod::PruneFrequency | MergeMethod::PruneReap)
    }

    fn default_align(self) -> Align {
        match self {
            MergeMethod::MSmoe => Align::Weight,
            _ => Align::None,
        }
    }

    fn default_grouping(self) -> Grouping {
        match self {
            MergeMethod::HcSmoe => Grouping::Outputs,
            _ => Grouping::RouterLogits,
        }
    }
}

/// Neuron alignment before averaging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Align {
    /// Weight matching (gate, up and down together).
    Weight,
    /// Correlation of intermediate activations on calibration inputs.
    Activation,
    /// No alignment.
    None,
}

/// How non-dominant experts find their group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Grouping {
    /// Cosine similarity of router-logit columns (MC-SMoE's default).
    RouterLogits,
    /// Cosine similarity of the flattened expert weights.
    Weights,
    /// Average-linkage clustering of mean expert outputs (HC-SMoE).
    Outputs,
}

/// How many experts to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// On average this many experts per merged layer.
    Experts(usize),
    /// This fraction of each layer's experts.
    Keep(f64),
}

/// Options of the merging pipeline.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The method.
    pub method: MergeMethod,
    /// Alignment (default: the method's).
    pub align: Option<Align>,
    /// Grouping (default: the method's).
    pub grouping: Option<Grouping>,
    /// How many experts remain.
    pub budget: Budget,
    /// MoE layers to reduce (indices of the calibrated blocks); all when `None`.
    pub layers: Option<Vec<usize>>,
    /// Show a progress bar over layers.
    pub progress: bool,
}

/// One group of a reduced layer.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct GroupReport {
    /// The group's dominant expert (its label).
    pub expert: usize,
    /// Router experts merged into it (the dominant included), ascending.
    pub members: Vec<usize>,
    /// Their usage frequencies.
    pub frequencies: Vec<f64>,
}

/// What happened to one layer.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct LayerReport {
    /// Block name.
    pub block: String,
    /// Experts before.
    pub experts_before: usize,
    /// Experts after.
    pub experts_after: usize,
    /// The merging method (None: experts not merged, only compressed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<MergeMethod>,
    /// Grouping used (merging methods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grouping: Option<Grouping>,
    /// Alignment used (merging methods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub align: Option<Align>,
    /// The groups (pruning: one per kept expert).
    pub groups: Vec<GroupReport>,
    /// Experts deleted with their router rows (pruning).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<usize>,
    /// Weight distance of the members to their dominant expert, summed, before and after
    /// alignment, and the relative reduction `1 − after / before` (None when nothing was aligned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alignment: Option<AlignmentReport>,
    /// How the layer's experts were compressed (`--target-size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::compress::LayerCompression>,
}

/// The alignment's effect in one layer.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct AlignmentReport {
    /// Σ ‖member − dominant‖ before.
    pub distance_before: f64,
    /// Σ ‖aligned member − dominant‖ after.
    pub distance_after: f64,
    /// 1 − after / before.
    pub gain: f64,
}

/// One new expert of a reduced layer.
#[derive(Debug, Clone)]
pub struct NewExpert {
    /// Router experts it answers (indices into the kept router rows).
    pub ids: Vec<usize>,
    /// Its weights (dense after merging; compression factors them).
    pub ffn: ProjFfn,
}

/// The reduced form of one layer.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    /// Block name.
    pub block: String,
    /// The new experts.
    pub experts: Vec<NewExpert>,
    /// Activation of every expert.
    pub act: Act,
    /// Router rows kept (pruning), else all.
    pub router_rows: Option<Vec<usize>>,
    /// Shared bases the experts' [`crate::moe::proj::Proj::BaseDelta`] projections add to.
    pub bases: Vec<Array2<f32>>,
    /// Compression of this layer (None: merged/pruned experts stored dense).
    pub compress: Option<crate::compress::LayerCompression>,
    /// The report.
    pub report: LayerReport,
}

/// Plans the reduction of every selected layer.
pub fn plan(
    g: &Graph,
    det: &Detection,
    stats: &CalibStats,
    opts: &MergeOptions,
) -> Result<Vec<LayerPlan>> {
    let mut plans = Vec::new();
    plan_each(g, det, stats, opts, |p| {
        plans.push(p);
        Ok(())
    })?;
    Ok(plans)
}

/// Plans the selected layers one after another, handing each plan to `take` before the next
/// layer's experts are read (the budget across layers needs only the statistics): a caller
/// that writes a plan out and drops it holds one layer's experts at a time.
pub fn plan_each(
    g: &Graph,
    det: &Detection,
    stats: &CalibStats,
    opts: &MergeOptions,
    mut take: impl FnMut(LayerPlan) -> Result<()>,
) -> Result<()> {
    let chosen = layer_counts(g, det, stats, opts)?;
    let bar = crate::progress::count_bar(opts.progress, chosen.len() as u64, "layers");
    bar.set_message("merging");
    for (b, s, m) in chosen {
        take(plan_layer(g, b, s, m, opts)?)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The selected layers with their statistics and the number of experts each keeps.
fn layer_counts<'a>(
    g: &Graph,
    det: &'a Detection,
    stats: &'a CalibStats,
    opts: &MergeOptions,
) -> Result<Vec<(&'a MoeBlock, &'a LayerStats, usize)>> {
    let chosen = select_layers(g, det, stats, opts.layers.as_deref())?;
    if let Budget::Experts(m) = opts.budget {
        let most = chosen
            .iter()
            .map(|(b, _)| b.router.num_experts)
            .max()
            .unwrap_or(0);
        if m > most {
            return Err(Error::Usage(format!(
                "--experts {m} keeps more experts than the reduced layers have (at most {most}); \
                 --method none re-emits them all"
            )));
        }
    }
    let uniform: Vec<usize> = chosen
        .iter()
        .map(|(b, _)| {
            let n = b.router.num_experts;
            match opts.budget {
                Budget::Experts(m) => m.clamp(1, n),
                Budget::Keep(f) => ((f * n as f64).round() as usize).clamp(1, n),
            }
        })
        .collect();
    let counts: Vec<usize> = match opts.method {
        MergeMethod::MSmoe | MergeMethod::Average => {
            let freqs: Vec<Vec<f64>> = chosen.iter().map(|(_, s)| s.frequency.clone()).collect();
            plan_budget(&freqs, uniform.iter().sum())
        }
        MergeMethod::PruneFrequency | MergeMethod::PruneReap => chosen
            .iter()
            .zip(&uniform)
            .map(|((b, _), &m)| {
                if m < b.router.top_k {
                    log::warn!(
                        "{}: keeping {} experts, not {m}: top-{} routing needs at least {}",
                        b.name,
                        b.router.top_k,
                        b.router.top_k,
                        b.router.top_k
                    );
                }
                m.max(b.router.top_k)
            })
            .collect(),
        MergeMethod::HcSmoe => uniform,
    };
    Ok(chosen
        .into_iter()
        .zip(counts)
        .map(|((b, s), m)| (b, s, m))
        .collect())
}

/// The identified blocks chosen by `layers` (indices as `inspect` numbers them; all when
/// `None`), each with its statistics; refuses statistics that do not fit the model.
pub(crate) fn select_layers<'a>(
    g: &Graph,
    det: &'a Detection,
    stats: &'a CalibStats,
    layers: Option<&[usize]>,
) -> Result<Vec<(&'a MoeBlock, &'a LayerStats)>> {
    let blocks = det.identified_blocks();
    let mut chosen: Vec<(&MoeBlock, &LayerStats)> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        if let Some(sel) = layers {
            if !sel.contains(&i) {
                continue;
            }
        }
        let s = stats
            .layers
            .iter()
            .find(|s| s.block == b.name)
            .ok_or_else(|| {
                Error::Stats(format!(
                    "the calibration statistics have no layer '{}' (were they made for another model?)",
                    b.name
                ))
            })?;
        if s.num_experts != b.router.num_experts {
            return Err(Error::Stats(format!(
                "statistics of '{}' are for {} experts, the model has {}",
                b.name, s.num_experts, b.router.num_experts
            )));
        }
        check_stats_fit(g, b, s)?;
        chosen.push((b, s));
    }
    if let Some(sel) = layers {
        if let Some(bad) = sel.iter().find(|&&i| i >= blocks.len()) {
            return Err(Error::Usage(format!(
                "--layers: no MoE layer {bad}; the model has {} (0..{})",
                blocks.len(),
                blocks.len()
            )));
        }
    }
    Ok(chosen)
}

/// Refuses statistics that were not computed on this block: another router (fingerprint),
/// top-k or hidden size, or arrays whose shapes do not fit (a hand-edited or truncated file).
fn check_stats_fit(g: &Graph, b: &MoeBlock, s: &LayerStats) -> Result<()> {
    let other = |what: String| {
        Error::Stats(format!(
            "the calibration statistics of '{}' were not computed on this model: {what}; \
             calibrate this model (smoe-opt calibrate MODEL ...)",
            b.name
        ))
    };
    let (n, h) = (b.router.num_experts, b.hidden());
    if !s.router_fingerprint.is_empty() {
        let fp = crate::calib::stats::router_fingerprint(g, b)?;
        if fp != s.router_fingerprint {
            return Err(other("its router weights differ".into()));
        }
    }
    if s.top_k != b.router.top_k {
        return Err(other(format!(
            "top-{} there, top-{} here",
            s.top_k, b.router.top_k
        )));
    }
    if s.hidden != 0 && s.hidden != h {
        return Err(other(format!("hidden size {} there, {h} here", s.hidden)));
    }
    let lens = [
        ("counts", s.counts.len()),
        ("frequency", s.frequency.len()),
        ("mean_weight", s.mean_weight.len()),
        // (empty: not collected)
        ("reap", if s.reap.is_empty() { n } else { s.reap.len() }),
        ("logit_cosine", s.logit_cosine.len()),
        ("samples", s.samples.len()),
    ];
    if let Some((what, len)) = lens.iter().find(|(_, l)| *l != n) {
        return Err(other(format!("'{what}' has {len} entries for {n} experts")));
    }
    if s.logit_cosine.iter().any(|r| r.len() != n) {
        return Err(other("'logit_cosine' is not N x N".into()));
    }
    if s.mean_output.dim() != (n, h) && s.mean_output.dim() != (0, h) {
        return Err(other(format!(
            "mean outputs are {:?}, not {n} x {h}",
            s.mean_output.dim()
        )));
    }
    if s.input_moments.iter().any(|m| m.dim() != (h, h)) {
        return Err(other(format!("input moments are not {h} x {h}")));
    }
    if s.samples.iter().flatten().any(|r| r.len() != h) {
        return Err(other(format!("routed samples are not {h} wide")));
    }
    Ok(())
}

/// Merges or prunes one layer to `m` experts.
pub(crate) fn plan_layer(
    g: &Graph,
    b: &MoeBlock,
    s: &LayerStats,
    m: usize,
    opts: &MergeOptions,
) -> Result<LayerPlan> {
    let n = b.router.num_experts;
    let mut params: Vec<Option<ExpertParams>> = vec![None; n];
    for e in &b.experts {
        params[e.index] = Some(expert_params(g, &e.ffn)?);
    }
    let params: Vec<ExpertParams> = params
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            p.ok_or_else(|| Error::Graph {
                node: Some(b.name.clone()),
                reason: format!("expert {i} is missing"),
            })
        })
        .collect::<Result<_>>()?;
    let act = b.experts[0].ffn.act;
    let f = &s.frequency;
    if opts.method.prunes() {
        if let Some(g) = b.router.groups {
            return Err(Error::Usage(format!(
                "{}: pruning removes router rows, but this router chooses experts within {} equal \
                 groups (DeepSeek-V3 style) that must stay equal; merge instead (--method m-smoe, \
                 hc-smoe or average keep every router row) or compress (--target-size)",
                b.name, g.count
            )));
        }
        let score = if opts.method == MergeMethod::PruneReap {
            if s.reap.is_empty() {
                return Err(Error::Stats(format!(
                    "{}: prune-reap needs REAP scores, which these statistics do not hold \
                     (calibrated with --collect routing); calibrate with --collect all",
                    b.name
                )));
            }
            &s.reap
        } else {
            f
        };
        let kept = prune_experts(score, m);
        let dropped: Vec<usize> = (0..n).filter(|i| !kept.contains(i)).collect();
        let experts = kept
            .iter()
            .enumerate()
            .map(|(pos, &e)| NewExpert {
                ids: vec![pos],
                ffn: ProjFfn::dense(params[e].clone(), act),
            })
            .collect();
        let groups = kept
            .iter()
            .map(|&e| GroupReport {
                expert: e,
                members: vec![e],
                frequencies: vec![f[e]],
            })
            .collect();
        return Ok(LayerPlan {
            block: b.name.clone(),
            experts,
            act,
            router_rows: Some(kept.clone()),
            bases: vec![],
            compress: None,
            report: LayerReport {
                block: b.name.clone(),
                experts_before: n,
                experts_after: kept.len(),
                method: Some(opts.method),
                grouping: None,
                align: None,
                groups,
                dropped,
                alignment: None,
                compression: None,
            },
        });
    }
    let grouping = opts.grouping.unwrap_or(opts.method.default_grouping());
    let mut align_mode = opts.align.unwrap_or(opts.method.default_align());
    let labels = match grouping {
        Grouping::RouterLogits => group_experts(f, &logit_similarity(&s.logit_cosine), m),
        Grouping::Weights => {
            let refs: Vec<&ExpertParams> = params.iter().collect();
            group_experts(f, &weight_similarity(&refs), m)
        }
        Grouping::Outputs if s.mean_output.nrows() == 0 => {
            return Err(Error::Stats(format!(
                "{}: output-based grouping (hc-smoe, --grouping outputs) needs the experts' mean \
                 outputs, which these statistics do not hold; calibrate with them (smoe-opt \
                 calibrate collects every statistic)",
                b.name
            )))
        }
        Grouping::Outputs => cluster_outputs(s.mean_output.view(), f, m),
    };
    if align_mode == Align::Activation && s.samples.iter().all(Vec::is_empty) {
        log::warn!(
            "{}: no calibration samples were kept (--reservoir 0 or data-free); aligning by weights",
            b.name
        );
        align_mode = Align::Weight;
    }
    let mut dominants: Vec<usize> = labels.clone();
    dominants.sort_unstable();
    dominants.dedup();
    // Alignment of every non-dominant member to its dominant, in parallel over pairs.
    let pairs: Vec<(usize, usize)> = (0..n)
        .filter(|&i| labels[i] != i)
        .map(|i| (labels[i], i))
        .collect();
    let align_one = |&(d, j): &(usize, usize)| -> Result<(usize, ExpertParams, f64, f64)> {
        let (r, t) = (&params[d], &params[j]);
        let cost = match align_mode {
            Align::None => {
                let dist = distance(r, t);
                return Ok((j, t.clone(), dist, dist));
            }
            Align::Weight => weight_cost(r, t),
            Align::Activation => {
                let rows: Vec<&Vec<f32>> = s.samples[d].iter().chain(&s.samples[j]).collect();
                let h = b.hidden();
                let x = Array2::from_shape_fn((rows.len(), h), |(a, c)| rows[a][c]);
                let hr = ProjFfn::dense(r.clone(), act).hidden(x.view(), &[]);
                let ht = ProjFfn::dense(t.clone(), act).hidden(x.view(), &[]);
                activation_cost(hr.view(), ht.view())
            }
        };
        let a = align(r, t, &cost).map_err(|e| Error::Graph {
            node: Some(b.name.clone()),
            reason: format!("aligning expert {j} to {d}: {e}"),
        })?;
        Ok((j, a.params, a.before, a.after))
    };
    // Pairs run in parallel, as many at a time as fit in ALIGN_MEMORY (each holds an I×I
    // similarity in f64 and one block of its products in f32); each pair's products also use
    // every core (faer), so a single pair at a time still keeps the machine busy.
    let inter = b.intermediate().max(1) as u64;
    let per_pair = inter * inter * 8 + (COST_BLOCK as u64) * inter * 4;
    let at_once =
        ((ALIGN_MEMORY / per_pair.max(1)) as usize).clamp(1, rayon::current_num_threads());
    let mut aligned: Vec<(usize, ExpertParams, f64, f64)> = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(at_once) {
        aligned.extend(
            chunk
                .par_iter()
                .map(align_one)
                .collect::<Result<Vec<_>>>()?,
        );
    }
    let mut ready: Vec<Option<ExpertParams>> = params.into_iter().map(Some).collect();
    let (mut before, mut after) = (0.0, 0.0);
    for (j, p, b0, a0) in aligned {
        ready[j] = Some(p);
        before += b0;
        after += a0;
    }
    let uniform = opts.method == MergeMethod::Average;
    let mut experts = Vec::new();
    let mut groups = Vec::new();
    for &d in &dominants {
        let members: Vec<usize> = (0..n).filter(|&i| labels[i] == d).collect();
        let refs: Vec<&ExpertParams> = members
            .iter()
            .map(|&i| ready[i].as_ref().expect("every expert is ready"))
            .collect();
        let w: Vec<f64> = members
            .iter()
            .map(|&i| if uniform { 1.0 } else { f[i] })
            .collect();
        experts.push(NewExpert {
            ids: members.clone(),
            ffn: ProjFfn::dense(merge_weighted(&refs, &w), act),
        });
        groups.push(GroupReport {
            expert: d,
            frequencies: members.iter().map(|&i| f[i]).collect(),
            members,
        });
    }
    let alignment = (align_mode != Align::None && !pairs.is_empty()).then(|| AlignmentReport {
        distance_before: before,
        distance_after: after,
        gain: if before > 0.0 {
            1.0 - after / before
        } else {
            0.0
        },
    });
    Ok(LayerPlan {
        block: b.name.clone(),
        act,
        router_rows: None,
        bases: vec![],
        compress: None,
        report: LayerReport {
            block: b.name.clone(),
            experts_before: n,
            experts_after: experts.len(),
            method: Some(opts.method),
            grouping: Some(grouping),
            align: Some(align_mode),
            groups,
            dropped: vec![],
            alignment,
            compression: None,
        },
        experts,
    })
}

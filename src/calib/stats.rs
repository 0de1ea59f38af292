//! Streaming routing statistics of one MoE layer: everything is a sum over tokens (or a
//! seeded reservoir), so batching never changes the result beyond float rounding, and no
//! activations are kept beyond the bounded reservoirs.
use super::ffn::DenseFfn;
use crate::error::Result;
use crate::ir::Graph;
use crate::moe::{MoeBlock, Scoring};
use ndarray::ArrayView1;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use rayon::prelude::*;
use serde::Serialize;

/// Knobs of the statistics.
#[derive(Debug, Clone)]
pub struct StatsConfig {
    /// Routed-input rows kept per expert (reservoir sampling).
    pub reservoir: usize,
    /// Seed of the reservoirs.
    pub seed: u64,
    /// Accumulate per-expert input second moments (H×H per expert).
    pub moments: bool,
    /// Run every expert on every token for the experts' mean outputs (output-based grouping,
    /// hc-smoe). Without it each expert runs on its routed tokens only (REAP needs no more),
    /// about N/k times less expert work, and `mean_output` is left empty.
    pub outputs: bool,
    /// Run each expert on its routed tokens for REAP saliency (`prune-reap`). Without it
    /// (and without `outputs`) no expert runs in calibration: what is left is what the
    /// runtime computes anyway (routing from the router logits), and `reap` is left empty.
    pub reap: bool,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            reservoir: 1024,
            seed: 0,
            moments: true,
            outputs: true,
            reap: true,
        }
    }
}

impl StatsConfig {
    /// Routing only: frequencies, routing weights and router-logit similarity, and the
    /// routed-input reservoirs (`reservoir` rows per expert); no expert outputs, REAP
    /// scores or input moments (enough for `m-smoe`, `average` and `prune-frequency`).
    pub fn routing_only(reservoir: usize, seed: u64) -> Self {
        StatsConfig {
            reservoir,
            seed,
            moments: false,
            outputs: false,
            reap: false,
        }
    }
}

/// SplitMix64: a tiny seeded generator (reservoir decisions only).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
}

/// Accumulates statistics of one block.
pub struct LayerAcc {
    block: MoeBlock,
    ffns: Vec<(usize, DenseFfn)>,
    cfg: StatsConfig,
    tokens: u64,
    counts: Vec<u64>,
    weight_sum: Vec<f64>,
    reap_sum: Vec<f64>,
    gram: Array2<f64>,
    out_sum: Array2<f64>,
    /// Per-expert Σ xᵀx, lower triangle (mirrored when finished).
    moments: Vec<faer::Mat<f64>>,
    reservoir: Vec<Vec<Vec<f32>>>,
    /// The reference model's input rows of the same tokens (paired calibration only).
    reservoir_ref: Vec<Vec<Vec<f32>>>,
    seen: Vec<u64>,
    rng: Rng,
    sel_bias: Option<Vec<f32>>,
    fingerprint: String,
}

/// One token's routing: chosen experts and their weights (dropped slots have weight 0 and
/// `kept = false`).
#[derive(Debug, Clone)]
pub struct Route {
    /// Expert index per slot.
    pub experts: Vec<usize>,
    /// Routing weight per slot.
    pub weights: Vec<f32>,
    /// Whether the slot survived the capacity limit.
    pub kept: Vec<bool>,
}

/// A hash identifying `block`'s router in `g` (its weights, bias and top-k), hex.
pub fn router_fingerprint(g: &Graph, block: &MoeBlock) -> Result<String> {
    let r = &block.router;
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    for v in crate::moe::weights::matrix(g, &r.weight)? {
        eat(&v.to_bits().to_le_bytes());
    }
    if let Some(b) = &r.bias {
        for v in crate::moe::weights::vector(g, b)? {
            eat(&v.to_bits().to_le_bytes());
        }
    }
    eat(&(r.top_k as u64).to_le_bytes());
    Ok(format!("{h:016x}"))
}

/// The block's selection bias values (DeepSeek-V3), read from `g`.
pub fn selection_bias(g: &Graph, block: &MoeBlock) -> Result<Option<Vec<f32>>> {
    block
        .router
        .selection_bias
        .as_ref()
        .map(|b| crate::moe::weights::vector(g, b))
        .transpose()
}

/// Routes tokens from router logits exactly as the block does: scoring, the choice (with the
/// selection bias `sel_bias` and expert groups, if any), top-k (ties to the lower index),
/// renormalisation, routed scaling, and Switch capacity per sequence of `seq_len` tokens.
pub fn route(
    block: &MoeBlock,
    sel_bias: Option<&[f32]>,
    logits: ArrayView2<f32>,
    seq_len: usize,
) -> Vec<Route> {
    let r = &block.router;
    let n = r.num_experts;
    let mut routes = Vec::with_capacity(logits.nrows());
    let mut choice = vec![0f32; n];
    for z in logits.rows() {
        if r.scoring == Scoring::Sparsemixer {
            routes.push(sparsemixer(z, r.jitter_eps.unwrap_or(0.0)));
            continue;
        }
        let scores: Vec<f32> = match r.scoring {
            Scoring::Softmax => {
                let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
                let s: f32 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            }
            Scoring::Sigmoid => z.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
            Scoring::SoftmaxAfterTopk | Scoring::Sparsemixer => z.to_vec(),
        };
        choice.copy_from_slice(&scores);
        if let Some(b) = sel_bias {
            choice.iter_mut().zip(b).for_each(|(c, b)| *c += b);
        }
        if let Some(g) = r.groups {
            mask_groups(&mut choice, g);
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
        let experts: Vec<usize> = order[..r.top_k].to_vec();
        let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
        if r.scoring == Scoring::SoftmaxAfterTopk {
            let m = weights.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            weights.iter_mut().for_each(|w| *w = (*w - m).exp());
            let s: f32 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= s);
        } else if r.renormalize {
            let s: f32 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= s);
        }
        if r.scale != 1.0 {
            weights.iter_mut().for_each(|w| *w *= r.scale);
        }
        routes.push(Route {
            kept: vec![true; experts.len()],
            experts,
            weights,
        });
    }
    if let Some(cap) = r.capacity {
        for seq in routes.chunks_mut(seq_len.max(1)) {
            let mut used = vec![0usize; n];
            for t in seq.iter_mut() {
                for (slot, &e) in t.experts.iter().enumerate() {
                    used[e] += 1;
                    if used[e] > cap {
                        t.kept[slot] = false;
                        t.weights[slot] = 0.0;
                    }
                }
            }
        }
    }
    routes
}

/// PhiMoE's sparsemixer on one token's logits `z` (top-2, ties to the lower index): pick `i1`
/// = argmax z, weighted by the softmax over `{j : (m1 − z_j)/max(|z_j|, m1) ≤ 2·eps}` at
/// `i1`; then `i2` = argmax over the others, weighted by the softmax over the others within
/// `2·eps` of `m2` (the same relative test, `|z_j|` of the original logits).
fn sparsemixer(z: ArrayView1<f32>, eps: f32) -> Route {
    let n = z.len();
    let argmax = |skip: Option<usize>| {
        (0..n)
            .filter(|&j| Some(j) != skip)
            .fold(None, |best: Option<usize>, j| match best {
                Some(b) if z[b] >= z[j] => Some(b),
                _ => Some(j),
            })
            .unwrap_or(0)
    };
    let weight = |pick: usize, skip: Option<usize>| {
        let m = z[pick];
        let inside = |j: usize| Some(j) != skip && (m - z[j]) / z[j].abs().max(m) <= 2.0 * eps;
        let s: f32 = (0..n)
            .filter(|&j| inside(j))
            .map(|j| (z[j] - m).exp())
            .sum();
        1.0 / s
    };
    let i1 = argmax(None);
    let w1 = weight(i1, None);
    let mut experts = vec![i1];
    let mut weights = vec![w1];
    if n > 1 {
        let i2 = argmax(Some(i1));
        experts.push(i2);
        weights.push(weight(i2, Some(i1)));
    }
    Route {
        kept: vec![true; experts.len()],
        experts,
        weights,
    }
}

/// Sets the choice scores of experts outside the best `g.top` groups to -inf; a group scores
/// the sum of its two best (ties to the lower group).
fn mask_groups(choice: &mut [f32], g: crate::moe::Groups) {
    let per = choice.len() / g.count;
    let score: Vec<f32> = choice
        .chunks(per)
        .map(|c| {
            let mut best = [f32::NEG_INFINITY; 2];
            for &v in c {
                if v > best[0] {
                    best = [v, best[0]];
                } else if v > best[1] {
                    best[1] = v;
                }
            }
            if per < 2 {
                best[0]
            } else {
                best[0] + best[1]
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..g.count).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    for &grp in &order[g.top..] {
        choice[grp * per..(grp + 1) * per].fill(f32::NEG_INFINITY);
    }
}

impl LayerAcc {
    /// A fresh accumulator for `block` (expert weights read from `g`).
    pub fn new(g: &Graph, block: &MoeBlock, cfg: StatsConfig, layer: usize) -> Result<Self> {
        let n = block.router.num_experts;
        let h = block.hidden();
        // The experts' weights are read only when experts run here.
        let ffns = if cfg.outputs || cfg.reap {
            block
                .experts
                .iter()
                .map(|e| DenseFfn::load(g, &e.ffn).map(|f| (e.index, f)))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(LayerAcc {
            block: block.clone(),
            ffns,
            tokens: 0,
            counts: vec![0; n],
            weight_sum: vec![0.0; n],
            reap_sum: vec![0.0; n],
            gram: Array2::zeros((n, n)),
            out_sum: Array2::zeros((n, h)),
            moments: if cfg.moments {
                vec![faer::Mat::zeros(h, h); n]
            } else {
                vec![]
            },
            reservoir: vec![Vec::new(); n],
            reservoir_ref: vec![Vec::new(); n],
            seen: vec![0; n],
            rng: Rng(cfg.seed ^ (layer as u64).wrapping_mul(0x2545F4914F6CDD1D)),
            sel_bias: selection_bias(g, block)?,
            fingerprint: router_fingerprint(g, block)?,
            cfg,
        })
    }

    /// Adds a batch: block inputs `x` [T, H], router logits [T, N], which tokens count
    /// (`keep`, false for padding), and the sequence length (for capacity).
    pub fn update(
        &mut self,
        x: ArrayView2<f32>,
        logits: ArrayView2<f32>,
        keep: &[bool],
        seq_len: usize,
    ) {
        self.update_paired(x, None, logits, keep, seq_len)
    }

    /// [`LayerAcc::update`] with `x_ref`, the same tokens' inputs to this block in a
    /// reference model (the original, for the sequential pipeline): the reservoirs keep each
    /// sampled row's reference row beside it.
    pub fn update_paired(
        &mut self,
        x: ArrayView2<f32>,
        x_ref: Option<ArrayView2<f32>>,
        logits: ArrayView2<f32>,
        keep: &[bool],
        seq_len: usize,
    ) {
        let routes = route(&self.block, self.sel_bias.as_deref(), logits, seq_len);
        let idx: Vec<usize> = (0..x.nrows()).filter(|&t| keep[t]).collect();
        if idx.is_empty() {
            return;
        }
        let xk = x.select(Axis(0), &idx);
        let rk = x_ref
            .filter(|r| r.dim() == x.dim())
            .map(|r| r.select(Axis(0), &idx));
        let zk = logits.select(Axis(0), &idx).mapv(f64::from);
        self.gram += &zk.t().dot(&zk);
        self.tokens += idx.len() as u64;
        // Rows of `xk` routed to each expert, in token order, with their routing weights.
        let mut routed: Vec<Vec<usize>> = vec![Vec::new(); self.counts.len()];
        let mut routed_w: Vec<Vec<f64>> = vec![Vec::new(); self.counts.len()];
        for (j, &t) in idx.iter().enumerate() {
            let rt = &routes[t];
            for (slot, &e) in rt.experts.iter().enumerate() {
                if rt.kept[slot] {
                    self.counts[e] += 1;
                    self.weight_sum[e] += rt.weights[slot] as f64;
                    routed[e].push(j);
                    routed_w[e].push(rt.weights[slot] as f64);
                }
            }
        }
        let norm =
            |row: ArrayView1<f32>| row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        // Expert outputs (REAP, mean outputs) and input moments, expert by expert in parallel;
        // each expert's sums are added in expert order, so any thread count gives the same.
        let (outputs, reap) = (self.cfg.outputs, self.cfg.reap);
        let sums: Vec<(usize, f64, Option<Array1<f64>>)> = self
            .ffns
            .par_iter()
            .map(|&(e, ref f)| {
                if outputs {
                    // Every token (mean outputs); REAP from the routed ones.
                    let out = f.forward(xk.view());
                    let r: f64 = routed[e]
                        .iter()
                        .zip(&routed_w[e])
                        .map(|(&j, &w)| w * norm(out.row(j)))
                        .sum();
                    (e, r, Some(out.sum_axis(Axis(0)).mapv(f64::from)))
                } else if reap && !routed[e].is_empty() {
                    let out = f.forward(xk.select(Axis(0), &routed[e]).view());
                    let r: f64 = out
                        .rows()
                        .into_iter()
                        .zip(&routed_w[e])
                        .map(|(row, &w)| w * norm(row))
                        .sum();
                    (e, r, None)
                } else {
                    (e, 0.0, None)
                }
            })
            .collect();
        for (e, r, s) in sums {
            self.reap_sum[e] += r;
            if let Some(s) = s {
                let mut dst = self.out_sum.row_mut(e);
                dst += &s;
            }
        }
        if !self.moments.is_empty() {
            // Added in place (no H×H buffer per batch).
            self.moments
                .par_iter_mut()
                .zip(&routed)
                .filter(|(_, rows)| !rows.is_empty())
                .for_each(|(m, rows)| {
                    crate::linalg::gram_add(m.as_mut(), xk.select(Axis(0), rows).view())
                });
        }
        for (e, rows) in routed.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let cap = self.cfg.reservoir;
            for &j in rows {
                self.seen[e] += 1;
                if self.reservoir[e].len() < cap {
                    self.reservoir[e].push(xk.row(j).to_vec());
                    if let Some(r) = &rk {
                        self.reservoir_ref[e].push(r.row(j).to_vec());
                    }
                } else if cap > 0 {
                    let k = (self.rng.next() % self.seen[e]) as usize;
                    if k < cap {
                        self.reservoir[e][k] = xk.row(j).to_vec();
                        if let Some(r) = &rk {
                            self.reservoir_ref[e][k] = r.row(j).to_vec();
                        }
                    }
                }
            }
        }
    }

    /// Statistics from the weights alone: uniform frequencies, router-weight row cosines.
    pub fn finish_data_free(self, g: &Graph) -> LayerStats {
        let n = self.counts.len();
        let w = crate::moe::weights::matrix(g, &self.block.router.weight).unwrap_or_default();
        let h = self.block.hidden();
        let mut gram = Array2::<f64>::zeros((n, n));
        if w.len() == n * h {
            let m = Array2::from_shape_vec((n, h), w.iter().map(|&v| f64::from(v)).collect())
                .expect("n x h");
            gram = m.dot(&m.t());
        }
        let mut s = self;
        s.gram = gram;
        let k = s.block.router.top_k as f64;
        let mut out = s.finish();
        out.frequency = vec![1.0 / n as f64; n];
        out.mean_weight = vec![1.0 / k; n];
        out
    }

    /// The finished statistics.
    pub fn finish(self) -> LayerStats {
        let n = self.counts.len();
        let total: u64 = self.counts.iter().sum();
        let per = |v: &Vec<f64>| -> Vec<f64> {
            v.iter()
                .zip(&self.counts)
                .map(|(s, &c)| if c > 0 { s / c as f64 } else { 0.0 })
                .collect()
        };
        let cos: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let d = (self.gram[[i, i]] * self.gram[[j, j]]).sqrt();
                        if d > 0.0 {
                            self.gram[[i, j]] / d
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let tokens = self.tokens.max(1) as f64;
        LayerStats {
            block: self.block.name.clone(),
            num_experts: n,
            top_k: self.block.router.top_k,
            hidden: self.block.hidden(),
            router_fingerprint: self.fingerprint.clone(),
            tokens: self.tokens,
            counts: self.counts.clone(),
            frequency: self
                .counts
                .iter()
                .map(|&c| {
                    if total > 0 {
                        c as f64 / total as f64
                    } else {
                        0.0
                    }
                })
                .collect(),
            mean_weight: per(&self.weight_sum),
            reap: if self.cfg.outputs || self.cfg.reap {
                per(&self.reap_sum)
            } else {
                Vec::new()
            },
            logit_cosine: cos,
            mean_output: if self.cfg.outputs {
                self.out_sum.mapv(|v| v / tokens)
            } else {
                Array2::zeros((0, self.block.hidden()))
            },
            input_moments: self
                .moments
                .iter()
                .zip(&self.counts)
                .map(|(m, &c)| {
                    let c = c.max(1) as f64;
                    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| {
                        m[(i.max(j), i.min(j))] / c
                    })
                })
                .collect(),
            samples: self.reservoir,
            reference_samples: self.reservoir_ref,
        }
    }
}

/// Finished statistics of one block.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct LayerStats {
    /// Block name.
    pub block: String,
    /// N.
    pub num_experts: usize,
    /// Top-k.
    pub top_k: usize,
    /// Hidden size H (0 in statistics written before it was recorded).
    #[serde(default)]
    pub hidden: usize,
    /// FNV-1a hash of the router's weights and bias: statistics are only used with the
    /// model they were computed on (empty in statistics written before it was recorded).
    #[serde(default)]
    pub router_fingerprint: String,
    /// Tokens counted (padding excluded).
    pub tokens: u64,
    /// Times each expert was in a token's top-k (after capacity).
    pub counts: Vec<u64>,
    /// counts / Σ counts.
    pub frequency: Vec<f64>,
    /// Mean routing weight when chosen.
    pub mean_weight: Vec<f64>,
    /// REAP saliency: mean over routed tokens of weight × ‖expert output‖ (empty when not
    /// collected: `calibrate --collect routing`).
    pub reap: Vec<f64>,
    /// Cosine similarity of router-logit columns over tokens (N×N).
    pub logit_cosine: Vec<Vec<f64>>,
    /// Each expert's mean output over all counted tokens (N×H; sidecar; 0×H when not
    /// collected, see [`StatsConfig::outputs`]).
    #[serde(skip)]
    pub mean_output: Array2<f64>,
    /// Per expert, E[x xᵀ] over its routed inputs (H×H each; sidecar).
    #[serde(skip)]
    pub input_moments: Vec<Array2<f64>>,
    /// Per expert, a reservoir of routed input rows (sidecar).
    #[serde(skip)]
    pub samples: Vec<Vec<Vec<f32>>>,
    /// Paired calibration only (the sequential pipeline): per expert, the reference model's
    /// input rows of the same tokens as `samples`, row for row; else empty.
    #[serde(skip)]
    pub reference_samples: Vec<Vec<Vec<f32>>>,
}

impl LayerStats {
    /// Drops the per-expert input moments and reservoirs (H×H and rows per expert): what is
    /// left describes the routing (counts, frequencies, weights, similarities) for reports.
    pub fn drop_samples(&mut self) {
        self.input_moments = Vec::new();
        self.samples = Vec::new();
        self.reference_samples = Vec::new();
    }
}

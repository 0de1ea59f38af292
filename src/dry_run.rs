//! `--dry-run`: what a run would do, with memory and disk estimates, before any heavy work
//! (nothing is calibrated, planned or written).
//!
//! The estimates are arithmetic on the detected blocks, not measurements:
//! - statistics: per reduced layer, the per-expert input moments (N·H² float64, collected
//!   for compression only) and the routed-row reservoirs (N·reservoir·H float32), all layers
//!   resident;
//! - a layer being planned: its experts as float32 (weights dequantised), plus the same again
//!   for the candidates built from them;
//! - the models: the original is memory-mapped (page cache, reclaimable), the written model
//!   is built in memory, and calibration/fidelity hand a model to the runtime (its own copy,
//!   reported separately).
use crate::error::Result;
use crate::model::Model;
use crate::moe::MoeBlock;
use std::fmt::Write as _;
use std::path::Path;

/// What the run is asked to do.
pub struct DryRunRequest<'a> {
    /// The input model.
    pub input: &'a Path,
    /// `--keep F` / `--experts M`.
    pub budget: Option<crate::merge::Budget>,
    /// `--target-size` / `--target-bytes`.
    pub target: Option<crate::compress::TargetSize>,
    /// `--layers` (indices among the identified blocks).
    pub layers: Option<&'a [usize]>,
    /// Reservoir rows per expert.
    pub reservoir: usize,
    /// Whether statistics come from a file (`--stats`: no calibration run).
    pub stats_file: bool,
    /// The calibration data, if any (its size sets the activation cache's).
    pub source: Option<crate::calib::Source>,
    /// `--pipeline`.
    pub pipeline: crate::sequential::Pipeline,
    /// `--memory-limit`.
    pub memory_limit: Option<u64>,
}

/// The activation cache of a segment-by-segment run, per flow, and the samples: the first
/// segment is run on the first sample and what it hands on (with the sample's inputs) is
/// measured, times the samples; later cuts carry about as much (BENCHMARKS.md compares this
/// with the peak a run reports). `None` without data or blocks.
fn cache_per_flow(
    model: &Model,
    det: &crate::moe::Detection,
    source: &crate::calib::Source,
) -> Result<Option<(u64, u64)>> {
    if matches!(source, crate::calib::Source::DataFree) || det.blocks.is_empty() {
        return Ok(None);
    }
    let data = crate::calib::load_inputs(model, source)?;
    let Some((_, first)) = data.first() else {
        return Ok(None);
    };
    let samples = first.shape()[0];
    if samples == 0 {
        return Ok(None);
    }
    let one: Vec<_> = data
        .iter()
        .map(|(k, v)| (k.clone(), crate::calib::slice(v, 0, 1)))
        .collect();
    let cut = crate::segment::cut(model, det)?;
    let opts = crate::calib::CalibOptions::for_runs(
        crate::runtime::Runtime::Auto,
        #[cfg(feature = "ort")]
        Default::default(),
        1,
    );
    let mut flow = crate::segment::flow::Flow::new(&cut, &one, 1, 1)?;
    let reemit = cut.segments[0]
        .block
        .as_deref()
        .and_then(|b| crate::segment::flow::own_block(&cut.segments[0].model, det, b).ok())
        .unwrap_or_default();
    flow.run(0, &cut.segments[0].model, &reemit, &opts)?;
    Ok(Some((flow.bytes() * samples as u64, samples as u64)))
}

fn gib(b: f64) -> String {
    crate::inspect::human_bytes(b.max(0.0) as u64)
}

/// The plan and its estimates, as text.
pub fn dry_run(req: &DryRunRequest) -> Result<String> {
    let model = Model::load(req.input)?;
    let det = crate::moe::detect(&model.graph);
    let blocks: Vec<&MoeBlock> = det.identified_blocks();
    let chosen: Vec<&MoeBlock> = match req.layers {
        Some(l) => l.iter().filter_map(|&i| blocks.get(i).copied()).collect(),
        None => blocks.clone(),
    };
    let file_bytes: u64 = std::fs::metadata(req.input).map_or(0, |m| m.len())
        + model.external_files().iter().map(|f| f.bytes).sum::<u64>();
    let mut s = String::new();
    let _ = writeln!(s, "dry run: nothing is calibrated, planned or written");
    let _ = writeln!(
        s,
        "model      {} ({} on disk, data included)",
        req.input.display(),
        gib(file_bytes as f64)
    );
    let _ = writeln!(
        s,
        "blocks     {} detected, {} identified, {} to reduce",
        det.blocks.len(),
        blocks.len(),
        chosen.len()
    );
    let expert_bytes: u64 = chosen.iter().map(|b| b.expert_bytes).sum();
    let (mut stats_mem, mut layer_max) = (0f64, 0f64);
    let mut removed = 0f64;
    for b in &chosen {
        let n = b.experts.len() as f64;
        let h = b.hidden() as f64;
        let elements: f64 = b.experts.iter().map(|e| e.ffn.params() as f64).sum();
        // Input moments are collected for compression only.
        let moments = if req.target.is_some() {
            n * h * h * 8.0
        } else {
            0.0
        };
        stats_mem += moments + n * req.reservoir as f64 * h * 4.0;
        layer_max = layer_max.max(elements * 4.0 * 2.0);
        let kept = match req.budget {
            Some(crate::merge::Budget::Keep(f)) => (f * n).round().max(1.0),
            Some(crate::merge::Budget::Experts(m)) => (m as f64).min(n),
            None => n,
        };
        removed += b.expert_bytes as f64 * (1.0 - kept / n);
        let _ = writeln!(
            s,
            "  {:<8} {} experts -> {}, top-{}, H {}, I {}, {} of experts{}",
            b.name,
            b.experts.len(),
            kept,
            b.router.top_k,
            b.hidden(),
            b.intermediate(),
            gib(b.expert_bytes as f64),
            b.quant()
                .map(|[q, _]| format!(" (QMoE int{})", q.bits))
                .unwrap_or_default()
        );
    }
    // Bytes the experts keep after merging, then after compression.
    let after_merge = expert_bytes as f64 - removed;
    let after = match req.target {
        Some(crate::compress::TargetSize::Fraction(f)) => after_merge.min(f * expert_bytes as f64),
        Some(crate::compress::TargetSize::Bytes(b)) => after_merge.min(b as f64),
        None => after_merge,
    };
    let out_bytes = file_bytes as f64 - expert_bytes as f64 + after;
    let _ = writeln!(
        s,
        "experts    {} -> about {} ({:.0}%)",
        gib(expert_bytes as f64),
        gib(after),
        100.0 * after / (expert_bytes as f64).max(1.0)
    );
    let _ = writeln!(s, "disk       the output takes about {}", gib(out_bytes));
    if !req.stats_file {
        let _ = writeln!(
            s,
            "           statistics (calibrate -o) would take about {}",
            gib(stats_mem)
        );
    }
    let own = stats_mem + layer_max + out_bytes;
    let _ = writeln!(
        s,
        "memory     about {} for smoe-opt itself: statistics {}, the largest layer being \
         planned {}, the written model {}; the original is memory-mapped ({}, page cache)",
        gib(own),
        gib(stats_mem),
        gib(layer_max),
        gib(out_bytes),
        gib(file_bytes as f64)
    );
    let _ = writeln!(
        s,
        "           the runtime holds its own copy during calibration (about {}) and both \
         models while measuring fidelity (about {})",
        gib(file_bytes as f64),
        gib(file_bytes as f64 + out_bytes)
    );
    let exec = crate::sequential::memory::choose(
        req.pipeline,
        file_bytes,
        crate::sequential::memory::available(req.memory_limit),
    );
    let _ = writeln!(
        s,
        "runs       models run {} ({})",
        if exec.segments {
            "segment by segment"
        } else {
            "whole"
        },
        exec.reason
    );
    if exec.segments {
        if let Some((per_flow, samples)) = match &req.source {
            Some(src) if !req.stats_file || req.target.is_some() => {
                cache_per_flow(&model, &det, src)?
            }
            _ => None,
        } {
            let tmp = std::env::temp_dir();
            let _ = writeln!(
                s,
                "disk       activations between segments (measured at the first cut on one \
                 sample): about {} per flow of {} samples, two flows at once (sequential \
                 refit, fidelity): about {} under {}{}",
                gib(per_flow as f64),
                samples,
                gib(2.0 * per_flow as f64),
                tmp.display(),
                crate::segment::free_bytes(&tmp)
                    .map(|f| format!(
                        " ({} free{})",
                        gib(f as f64),
                        if f < 2 * per_flow {
                            " — not enough"
                        } else {
                            ""
                        }
                    ))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(avail) = crate::sequential::memory::available(req.memory_limit) {
        let need = own + file_bytes as f64 + out_bytes;
        let _ = writeln!(
            s,
            "           available now: {}{}",
            gib(avail as f64),
            if need > avail as f64 {
                " — the run would likely not fit"
            } else {
                ""
            }
        );
    }
    Ok(s)
}

//! The reducing job (`--method m-smoe|hc-smoe|prune-*|average`, `--target-size`): calibrate on
//! the fitting split, plan (merge, then compress), rewrite, measure fidelity on the held-out split, refuse or write, report.
use crate::calib::{self, CalibOptions, CalibStats, Source};
use crate::error::{Error, Result};
use crate::fidelity::{self, Fidelity};
use crate::merge::{self, Align, Budget, Grouping, LayerReport, MergeMethod, MergeOptions};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use serde::Serialize;
use std::path::PathBuf;

/// Options of a reducing run.
#[derive(Debug, Clone)]
pub struct ReduceOptions {
    /// The method.
    pub method: MergeMethod,
    /// Alignment override.
    pub align: Option<Align>,
    /// Grouping override.
    pub grouping: Option<Grouping>,
    /// Experts to keep (merging); None compresses the unmerged experts.
    pub budget: Option<Budget>,
    /// Compression under a byte budget (`--target-size`), after the merge if any.
    pub compress: Option<crate::compress::CompressOptions>,
    /// MoE layers to reduce (all when `None`).
    pub layers: Option<Vec<usize>>,
    /// Statistics saved by `smoe-opt calibrate` (instead of calibrating here).
    pub stats: Option<PathBuf>,
    /// Calibration (runtime, data source, batch, statistics knobs). `source` is unused when
    /// `stats` is given.
    pub calib: Option<CalibOptions>,
    /// Held-out evaluation inputs (.npz); else `holdout` of the calibration samples.
    pub eval_data: Option<PathBuf>,
    /// Fraction of calibration samples held out for the fidelity measurement.
    pub holdout: f64,
    /// Fail (nothing written) when the held-out `rel_l2` exceeds this.
    pub max_error: Option<f64>,
    /// Runtime for the fidelity measurement.
    pub runtime: calib::Runtime,
    /// onnxruntime execution provider.
    #[cfg(feature = "ort")]
    pub ep: crate::runtime::ort::Ep,
    /// Samples per runtime call.
    pub batch: usize,
    /// Form of the rewritten blocks.
    pub emit: crate::emit::EmitForm,
    /// One-shot or layer-by-layer fitting of a compression plan (`--pipeline`).
    pub pipeline: crate::sequential::Pipeline,
    /// Plan as if only this many bytes of memory were available (`--memory-limit`).
    pub memory_limit: Option<u64>,
}

impl ReduceOptions {
    /// A reduction by `method` with the command line's defaults and calibration `calib`:
    /// no expert budget and no compression yet (set `budget` and/or `compress`), every
    /// layer, 25% of the calibration samples held out for fidelity, `--runtime auto`, 8
    /// samples per call, `--emit auto`, `--pipeline auto`. Merging reads routing statistics
    /// only; with `compress` set, also collect input moments and expert outputs
    /// (`calib.stats.moments`/`outputs`) as the command line does.
    pub fn new(method: MergeMethod, calib: CalibOptions) -> Self {
        ReduceOptions {
            method,
            align: None,
            grouping: None,
            budget: None,
            compress: None,
            layers: None,
            stats: None,
            runtime: calib.runtime,
            #[cfg(feature = "ort")]
            ep: calib.ep,
            batch: calib.batch,
            calib: Some(calib),
            eval_data: None,
            holdout: 0.25,
            max_error: None,
            emit: crate::emit::EmitForm::Auto,
            pipeline: crate::sequential::Pipeline::Auto,
            memory_limit: None,
        }
    }
}

/// Where the statistics came from.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct CalibrationReport {
    /// Runtime used.
    pub runtime: String,
    /// Data description.
    pub source: String,
    /// Samples the statistics were fitted on.
    pub samples_fit: usize,
    /// Held-out samples (fidelity), never used to fit.
    pub samples_heldout: usize,
    /// Where the held-out samples came from.
    pub heldout_source: String,
    /// Tokens counted in the first layer (padding excluded).
    pub tokens: u64,
}

/// What a reducing run did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ReduceOutcome {
    /// Statistics provenance.
    pub calibration: CalibrationReport,
    /// Per reduced layer.
    pub layers: Vec<LayerReport>,
    /// The compression plan as a whole (`--target-size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::compress::CompressionSummary>,
    /// What the rewrite did to each reduced block (reported under `blocks`).
    #[serde(skip)]
    pub rewrites: Vec<crate::emit::BlockRewrite>,
    /// Held-out fidelity (None when there were no held-out samples).
    pub fidelity: Option<Fidelity>,
    /// Whether models were run whole or segment by segment, and why.
    pub execution: crate::sequential::Execution,
    /// Wall time of each stage.
    pub seconds: StageSeconds,
}

/// Wall time of each stage of a reducing run, in seconds.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct StageSeconds {
    /// Loading data and calibrating (or loading statistics).
    pub calibrate: f64,
    /// Grouping, alignment and merging.
    pub plan: f64,
    /// Writing the new blocks into the graph.
    pub emit: f64,
    /// Running both models on the held-out samples.
    pub fidelity: f64,
}

/// Fitting samples the auto planner's alternatives are compared on.
const SELECTION_SAMPLES: usize = 16;

/// How much each layer's calibrated error moves the model's output end to end: every layer in
/// turn is compressed alone (low rank at the target fraction), the written model measured on
/// `selection` (KL, else relative L2) and divided by the layer's calibrated error. None
/// without selection samples or with a single layer.
fn sensitivities(
    model: &Model,
    det: &Detection,
    stats: &CalibStats,
    c: &crate::compress::CompressOptions,
    sel: Option<&Selection>,
    opts: &ReduceOptions,
) -> Result<Option<Vec<f64>>> {
    use crate::compress::{CompressOptions, Family, TargetSize};
    let layers: Vec<usize> = match &c.layers {
        Some(l) => l.clone(),
        None => (0..det.identified_blocks().len()).collect(),
    };
    let Some(sel) = sel.filter(|_| layers.len() >= 2) else {
        return Ok(None);
    };
    let frac = match c.target {
        TargetSize::Fraction(f) => f,
        TargetSize::Bytes(_) => 0.5,
    };
    let mut w = Vec::new();
    // The probe compression: low rank, or neuron pruning where factors cannot be stored (QMoE).
    let blocks = det.identified_blocks();
    let family = if blocks.iter().any(|b| b.quant().is_some()) {
        Family::Neurons
    } else {
        Family::LowRank
    };
    for &l in &layers {
        let probe = CompressOptions {
            family,
            target: TargetSize::Fraction(frac),
            merge: None,
            layers: Some(vec![l]),
            progress: false,
            layer_weights: None,
        };
        let alt = crate::compress::plan(&model.graph, det, stats, &probe)?.swap_remove(0);
        let err = alt.plans[0].compress.as_ref().map_or(0.0, |x| x.error);
        // The other layers stay in the exporter's form, which may be shape-specialised and
        // fail on these samples: then the layers are not weighted (the plans still are
        // compared end to end, with every layer rewritten).
        let score = match score_plans(model, det, &alt.plans, sel, opts) {
            Ok((score, _)) => score,
            Err(e) => {
                log::info!("layer sensitivities not measured: {e}");
                return Ok(None);
            }
        };
        let s = if err > 1e-12 && score.is_finite() {
            score / err
        } else {
            1.0
        };
        log::info!("layer {l}: calibrated error {err:.4}, end to end {score:.5}: weight {s:.3}");
        w.push(s);
    }
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    if mean.is_finite() && mean > 0.0 {
        Ok(Some(w.into_iter().map(|x| x / mean).collect()))
    } else {
        Ok(None)
    }
}

/// Calibration samples the auto planner compares plans on, with the original's outputs.
struct Selection {
    data: Data,
    reference: fidelity::Reference,
    /// The original cut into segments when written models are measured segment by segment
    /// (the reference was computed so).
    cut: Option<crate::segment::Segmentation>,
}

/// The options of a model run outside calibration (fidelity, end-to-end comparisons).
/// Whether the run shows progress bars (its calibration options say so).
fn shows_progress(opts: &ReduceOptions) -> bool {
    opts.calib.as_ref().is_some_and(|c| c.progress)
}

/// How the reduction runs models outside calibration: its runtime and batch, with progress
/// bars when the run shows them.
fn run_options(opts: &ReduceOptions) -> CalibOptions {
    CalibOptions {
        progress: shows_progress(opts),
        ..CalibOptions::for_runs(
            opts.runtime,
            #[cfg(feature = "ort")]
            opts.ep,
            opts.batch,
        )
    }
}

/// Writes `plans` into a copy of `model` and scores it against the original's outputs on
/// `selection`: KL of next-token distributions for language models, else relative L2.
fn score_plans(
    model: &Model,
    det: &Detection,
    plans: &[crate::merge::LayerPlan],
    sel: &Selection,
    opts: &ReduceOptions,
) -> Result<(f64, &'static str)> {
    if let Some(cut) = &sel.cut {
        let f = fidelity::measure_segmented_against(
            &sel.reference,
            model,
            cut,
            det,
            plans,
            opts.emit,
            &sel.data,
            &run_options(opts),
        )?;
        return Ok(match f.kl {
            Some(kl) => (kl, "kl"),
            None => (f.rel_l2, "rel_l2"),
        });
    }
    let mut m = model.clone();
    crate::emit::merged::rewrite(&mut m, det, plans, opts.emit)?;
    let f = fidelity::measure_against(&sel.reference, &m, &sel.data, &run_options(opts))?;
    Ok(match f.kl {
        Some(kl) => (kl, "kl"),
        None => (f.rel_l2, "rel_l2"),
    })
}

/// Picks among the compression alternatives: the one whose written model is closest to the
/// original end to end on `selection` (KL for language models, else relative L2). With one
/// alternative, or no selection samples, the first is taken.
fn choose_alternative(
    model: &Model,
    det: &Detection,
    mut alts: Vec<crate::compress::Alternative>,
    sel: Option<&Selection>,
    opts: &ReduceOptions,
) -> Result<crate::compress::Alternative> {
    let sel = match sel {
        Some(sel) if alts.len() > 1 => sel,
        _ => {
            if alts.len() > 1 {
                log::warn!(
                "no calibration samples (or no runtime ran the original on them) to compare the \
                 compression plans end to end (with --stats, also give the calibration data): \
                 taking '{}', which only per-layer errors chose",
                alts[0].summary.plan
            );
            }
            return Ok(alts.swap_remove(0));
        }
    };
    let mut scores = Vec::new();
    for a in &alts {
        let (score, metric) = score_plans(model, det, &a.plans, sel, opts)?;
        log::info!("compression plan '{}': {metric} {score:.5}", a.summary.plan);
        scores.push((if score.is_nan() { f64::INFINITY } else { score }, metric));
    }
    let best = (0..alts.len())
        .min_by(|&a, &b| scores[a].0.total_cmp(&scores[b].0).then(a.cmp(&b)))
        .expect("alternatives");
    let table: Vec<crate::compress::AlternativeScore> = alts
        .iter()
        .zip(&scores)
        .enumerate()
        .map(|(i, (a, (s, m)))| crate::compress::AlternativeScore {
            plan: a.summary.plan.clone(),
            score: *s,
            metric: m.to_string(),
            chosen: i == best,
        })
        .collect();
    let mut a = alts.swap_remove(best);
    a.summary.chosen_by = Some(table);
    Ok(a)
}

/// The one-shot plan `a`, or the same plan refitted layer by layer (`--pipeline`): `auto`
/// measures both end to end on the selection samples and keeps the better.
fn choose_pipeline(
    model: &Model,
    det: &Detection,
    mut a: crate::compress::Alternative,
    fit: &[(String, Value)],
    sel: Option<&Selection>,
    ro: crate::sequential::RefitOptions,
    opts: &ReduceOptions,
) -> Result<crate::compress::Alternative> {
    use crate::sequential::Pipeline;
    // One layer: its inputs are the original's either way; layers written as they are
    // depend on no statistics.
    let refits = a
        .recipes
        .iter()
        .skip(1)
        .filter(|r| !r.is_identity())
        .count();
    if opts.pipeline == Pipeline::OneShot || a.plans.len() < 2 || refits == 0 {
        if opts.pipeline == Pipeline::Sequential {
            // Nothing after the first layer depends on statistics: the layer-by-layer fit
            // is the one-shot one.
            log::info!("--pipeline sequential: no later layer to refit; the plan stands");
            a.summary.pipeline = Pipeline::Sequential;
        }
        return Ok(a);
    }
    let calib = match &opts.calib {
        Some(c) if samples(fit) > 0 => c,
        _ if opts.pipeline == Pipeline::Sequential => {
            return Err(Error::Usage(
                "--pipeline sequential calibrates every layer again on the rewritten earlier \
                 layers: give calibration data (--calib, --calib-text or --calib-random; with \
                 --stats, as well)"
                    .into(),
            ))
        }
        _ => return Ok(a),
    };
    let sel = match sel {
        Some(sel) => sel,
        None if opts.pipeline == Pipeline::Sequential => {
            return crate::sequential::refit(model, det, &a, calib, fit, ro, None)
        }
        None => {
            log::info!("--pipeline auto: no selection samples to compare on; one-shot");
            return Ok(a);
        }
    };
    let mut s = match crate::sequential::refit(model, det, &a, calib, fit, ro, None) {
        Ok(s) => s,
        // `auto` only: the sequential fit is the optional one; it must not cost the run.
        Err(e) if opts.pipeline == Pipeline::Auto => {
            log::warn!(
                "--pipeline auto: the sequential fit failed ({e}); writing the one-shot fit"
            );
            return Ok(a);
        }
        Err(e) => return Err(e),
    };
    let (seq, metric) = score_plans(model, det, &s.plans, sel, opts)?;
    let chosen = a
        .summary
        .chosen_by
        .as_ref()
        .and_then(|t| t.iter().find(|x| x.chosen).map(|x| x.score));
    let one = match chosen {
        Some(x) => x,
        None => score_plans(model, det, &a.plans, sel, opts)?.0,
    };
    log::info!("one-shot {metric} {one:.5}, sequential {metric} {seq:.5}");
    let take_seq = opts.pipeline == Pipeline::Sequential || seq < one;
    let mut table = a.summary.chosen_by.take().unwrap_or_else(|| {
        vec![crate::compress::AlternativeScore {
            plan: a.summary.plan.clone(),
            score: one,
            metric: metric.to_string(),
            chosen: true,
        }]
    });
    if take_seq {
        for x in &mut table {
            x.chosen = false;
        }
    }
    table.push(crate::compress::AlternativeScore {
        plan: s.summary.plan.clone(),
        score: seq,
        metric: metric.to_string(),
        chosen: take_seq,
    });
    if take_seq {
        s.summary.chosen_by = Some(table);
        Ok(s)
    } else {
        a.summary.chosen_by = Some(table);
        Ok(a)
    }
}

fn samples(data: &[(String, Value)]) -> usize {
    data.first().map_or(0, |(_, v)| v.shape()[0])
}

/// Named arrays, first axis = samples.
type Data = Vec<(String, Value)>;

fn split(data: &[(String, Value)], at: usize) -> (Data, Data) {
    let n = samples(data);
    let a = data
        .iter()
        .map(|(k, v)| (k.clone(), calib::slice(v, 0, at)))
        .collect();
    let b = data
        .iter()
        .map(|(k, v)| (k.clone(), calib::slice(v, at, n)))
        .collect();
    (a, b)
}

/// Reduces `model` in place; returns what was done. `original` stays untouched for the
/// fidelity measurement.
pub fn reduce(model: &mut Model, det: &Detection, opts: &ReduceOptions) -> Result<ReduceOutcome> {
    // Fail before calibrating on what cannot be written.
    for b in det.identified_blocks() {
        crate::emit::portable::block_float(&model.graph, b)?;
    }
    let original = model.clone();
    let mut execution = crate::sequential::memory::choose(
        opts.pipeline,
        crate::sequential::memory::model_bytes(model),
        crate::sequential::memory::available(opts.memory_limit),
    );
    // A test knob: every run whole, what the segment-by-segment runs must agree with.
    if std::env::var_os("SMOE_SEQUENTIAL_WHOLE_MODEL").is_some() && execution.segments {
        execution.segments = false;
        execution.reason += " (SMOE_SEQUENTIAL_WHOLE_MODEL is set: models run whole)";
    }
    log::info!(
        "models run {} ({})",
        if execution.segments {
            "segment by segment"
        } else {
            "whole"
        },
        execution.reason
    );
    // The planner in bounded memory: sequential, a fixed family on float experts, no merge
    // first. Its global plan needs of each layer only the spectra, computed as the layer's
    // segment is calibrated (from the whole model's statistics when models run whole); the
    // layers are then built one at a time, and written as they are when segment by segment.
    let streamed_family = opts
        .compress
        .as_ref()
        .filter(|c| crate::compress::streamed::supports(c))
        .map(|c| c.family)
        .filter(|_| {
            execution.pipeline == crate::sequential::Pipeline::Sequential
                && opts.budget.is_none()
                && opts.layers.is_none()
                && opts.stats.is_none()
                && det.identified_blocks().iter().all(|b| b.quant().is_none())
        });
    let mut spectra: Option<Vec<crate::compress::streamed::LayerSpectrum>> = None;
    let mut seconds = StageSeconds::default();
    let t = std::time::Instant::now();
    // Statistics and the held-out split.
    let eval_from_file = match &opts.eval_data {
        Some(p) => Some(calib::load_inputs(model, &Source::Npz(p.clone()))?),
        None => None,
    };
    let (stats, calibration, heldout, selection, fit): (
        CalibStats,
        CalibrationReport,
        Data,
        Data,
        Data,
    ) = match (&opts.stats, &opts.calib) {
        (Some(path), _) => {
            let stats = calib::load(path)?;
            let held = eval_from_file.unwrap_or_default();
            if samples(&held) == 0 {
                log::warn!(
                    "--stats without --eval-data: fidelity cannot be measured on held-out data"
                );
            }
            let rep = CalibrationReport {
                runtime: stats.runtime.clone(),
                source: format!("{} (statistics file {})", stats.source, path.display()),
                samples_fit: stats.samples,
                samples_heldout: samples(&held),
                heldout_source: opts
                    .eval_data
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string()),
                tokens: stats.layers.first().map_or(0, |l| l.tokens),
            };
            // Calibration data given beside --stats serves the auto planner's end-to-end
            // comparison (its last samples) and the sequential refits.
            let all = match &opts.calib {
                Some(c) if opts.compress.is_some() && !matches!(c.source, Source::DataFree) => {
                    calib::load_inputs(model, &c.source)?
                }
                _ => vec![],
            };
            let n = samples(&all);
            if n == 0
                && opts.compress.is_some()
                && opts.pipeline == crate::sequential::Pipeline::Sequential
            {
                return Err(Error::Usage(
                    "--pipeline sequential with --stats also needs the calibration data \
                     (--calib, --calib-text or --calib-random): every layer is calibrated \
                     again on the rewritten earlier layers"
                        .into(),
                ));
            }
            let sel = split(&all, n - n.min(SELECTION_SAMPLES)).1;
            (stats, rep, held, sel, all)
        }
        (None, Some(c)) => {
            let all = match c.source {
                Source::DataFree => vec![],
                _ => calib::load_inputs(model, &c.source)?,
            };
            let n = samples(&all);
            let (fit, held, held_src) = match eval_from_file {
                Some(e) => (
                    all,
                    e,
                    opts.eval_data
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string()),
                ),
                None => {
                    let h = if n >= 2 && opts.holdout > 0.0 {
                        ((opts.holdout * n as f64).ceil() as usize).clamp(1, n - 1)
                    } else {
                        0
                    };
                    let (fit, held) = split(&all, n - h);
                    let src = if h > 0 {
                        format!("last {h} of {n} calibration samples (not used to fit)")
                    } else {
                        "none".into()
                    };
                    (fit, held, src)
                }
            };
            let stats = if execution.segments {
                let segmented = match streamed_family {
                    Some(family) => {
                        let mut got = Vec::new();
                        let r = calib::calibrate_segmented_with(
                            model,
                            det,
                            c,
                            &fit,
                            &mut |seg, one, layer| {
                                let block = layer.block.clone();
                                let mut s = calib::CalibStats::of_layer(layer);
                                got.push(crate::compress::streamed::layer_spectrum(
                                    &seg.graph, one, &s, &block, family,
                                )?);
                                let mut layer = s.layers.swap_remove(0);
                                layer.drop_samples();
                                Ok(layer)
                            },
                        );
                        if r.is_ok() {
                            spectra = Some(got);
                        }
                        r
                    }
                    None => calib::calibrate_segmented(model, det, c, &fit),
                };
                match segmented {
                    Ok(s) => s,
                    Err(e) if !execution.whole_fits => return Err(e),
                    Err(e) => {
                        log::warn!(
                            "calibration segment by segment failed ({e}); calibrating on the \
                             whole model"
                        );
                        calib::calibrate_on(model, det, c, &fit)?
                    }
                }
            } else {
                calib::calibrate_on(model, det, c, &fit)?
            };
            if let (Some(family), None) = (streamed_family, &spectra) {
                spectra = Some(
                    det.identified_blocks()
                        .iter()
                        .map(|b| {
                            crate::compress::streamed::layer_spectrum(
                                &model.graph,
                                det,
                                &stats,
                                &b.name,
                                family,
                            )
                        })
                        .collect::<Result<_>>()?,
                );
            }
            let rep = CalibrationReport {
                runtime: stats.runtime.clone(),
                source: stats.source.clone(),
                samples_fit: stats.samples,
                samples_heldout: samples(&held),
                heldout_source: held_src,
                tokens: stats.layers.first().map_or(0, |l| l.tokens),
            };
            // The auto planner's alternatives are compared on the last fitting samples
            // (never on the held-out ones, which only measure the result).
            let nf = samples(&fit);
            let (_, sel) = split(&fit, nf - nf.min(SELECTION_SAMPLES));
            (stats, rep, held, sel, fit)
        }
        (None, None) => {
            return Err(Error::Usage(
                "merging needs routing statistics: give calibration data (--calib FILE.npz, \
                     --calib-text FILE --tokenizer tokenizer.json, --calib-random N, --data-free) \
                     or --stats FILE from `smoe-opt calibrate`"
                    .into(),
            ))
        }
    };
    // `auto` turned sequential by memory refits only with calibration samples to refit on
    // (the user's `--pipeline sequential` without them was refused above).
    if opts.pipeline == crate::sequential::Pipeline::Auto
        && execution.pipeline == crate::sequential::Pipeline::Sequential
        && samples(&fit) == 0
    {
        execution.pipeline = crate::sequential::Pipeline::Auto;
        execution.reason += "; no calibration samples to refit on: the one-shot fit stands";
    }
    let resolved = ReduceOptions {
        pipeline: execution.pipeline,
        ..opts.clone()
    };
    let opts = &resolved;
    if opts.max_error.is_some() && samples(&heldout) == 0 {
        return Err(Error::Usage(
            "--max-error needs held-out samples: give --eval-data FILE.npz, or calibration data \
             with at least 2 samples and --holdout > 0"
                .into(),
        ));
    }
    let mopts = opts.budget.map(|budget| MergeOptions {
        method: opts.method,
        align: opts.align,
        grouping: opts.grouping,
        budget,
        layers: opts.layers.clone(),
        progress: shows_progress(opts),
    });
    seconds.calibrate = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    // The layers already written into `model` by the planner in bounded memory, with the
    // held-out fidelity measured as they were.
    let mut written: Option<(Vec<crate::emit::BlockRewrite>, Option<Fidelity>)> = None;
    let (plans, compression) = match (&opts.compress, mopts) {
        (Some(c), m) => {
            let mut c = c.clone();
            c.merge = m;
            c.layers = opts.layers.clone();
            // The original's outputs on the selection samples, computed once for every
            // plan compared end to end.
            // (Also what `--pipeline auto` compares the one-shot and sequential fits on.)
            let compared = c.family == crate::compress::Family::Auto
                || (opts.pipeline == crate::sequential::Pipeline::Auto
                    && det.identified_blocks().len() > 1);
            let sel = if compared && samples(&selection) > 0 {
                let cut = if execution.segments {
                    crate::segment::cut(model, det)
                        .map_err(|e| log::warn!("the model cannot be cut into segments: {e}"))
                        .ok()
                } else {
                    None
                };
                let reference = if let Some(cut) = &cut {
                    fidelity::reference_segmented(model, cut, det, &selection, &run_options(opts))
                } else if execution.segments && !execution.whole_fits {
                    Err(Error::Usage(
                        "the model cannot be cut into segments and does not fit in memory \
                         run whole"
                            .into(),
                    ))
                } else {
                    fidelity::reference(model, det, &selection, &run_options(opts))
                };
                match reference {
                    Ok(reference) => Some(Selection {
                        data: selection,
                        reference,
                        cut,
                    }),
                    Err(e) => {
                        log::warn!("the original did not run on the selection samples: {e}");
                        None
                    }
                }
            } else {
                None
            };
            if c.family == crate::compress::Family::Auto && c.merge.is_none() {
                c.layer_weights = sensitivities(model, det, &stats, &c, sel.as_ref(), opts)?;
            }
            let ro = crate::sequential::RefitOptions {
                emit: opts.emit,
                family: c.family,
                whole_fallback: execution.whole_fits,
            };
            let streamed = match (&spectra, &opts.calib) {
                (Some(spectra), Some(calib)) if samples(&fit) > 0 => {
                    let (recipes, summary) =
                        crate::compress::streamed::allocate(spectra, c.family, c.target)?;
                    let plan = crate::compress::Alternative {
                        plans: vec![],
                        recipes,
                        summary,
                    };
                    // Written as they are built when segment by segment (whole models:
                    // the model fits, and is written below).
                    let mut sink = crate::sequential::Sink {
                        model: &mut *model,
                        heldout: heldout.clone(),
                        written: false,
                        fidelity: None,
                        rewrites: vec![],
                    };
                    match crate::sequential::refit(
                        &original,
                        det,
                        &plan,
                        calib,
                        &fit,
                        ro,
                        execution.segments.then_some(&mut sink),
                    ) {
                        Ok(a) => {
                            if sink.written {
                                written = Some((
                                    std::mem::take(&mut sink.rewrites),
                                    sink.fidelity.take(),
                                ));
                            }
                            Some(a)
                        }
                        Err(e) if !execution.whole_fits => return Err(e),
                        Err(e) => {
                            log::warn!(
                                "the layer-by-layer plan failed ({e}); planning every layer at \
                                 once on the whole model"
                            );
                            *model = original.clone();
                            None
                        }
                    }
                }
                _ => None,
            };
            let a = match streamed {
                Some(a) => a,
                None => {
                    // The statistics the layer-by-layer planner kept hold no samples: after
                    // its failure the whole model is calibrated again.
                    let full;
                    let stats = match (&spectra, &opts.calib) {
                        (Some(_), Some(cal)) => {
                            full = calib::calibrate_on(&original, det, cal, &fit)?;
                            &full
                        }
                        _ => &stats,
                    };
                    let alts = crate::compress::plan(&model.graph, det, stats, &c)?;
                    let a = choose_alternative(model, det, alts, sel.as_ref(), opts)?;
                    choose_pipeline(model, det, a, &fit, sel.as_ref(), ro, opts)?
                }
            };
            (a.plans, Some(a.summary))
        }
        (None, Some(m)) => {
            // Segment by segment, each layer is merged, written and moved out of memory
            // before the next is read (the models' own memory is short, or asked to be).
            let streamed = if execution.segments {
                match merge::streamed::merge_by_segment(
                    &original,
                    model,
                    det,
                    &stats,
                    &m,
                    opts.emit,
                    &heldout,
                    &run_options(opts),
                ) {
                    Ok(w) => {
                        written = Some((w.rewrites, w.fidelity));
                        Some(w.plans)
                    }
                    Err(e) if !execution.whole_fits => return Err(e),
                    Err(e) => {
                        log::warn!(
                            "merging segment by segment failed ({e}); merging every layer at \
                             once"
                        );
                        *model = original.clone();
                        None
                    }
                }
            } else {
                None
            };
            let plans = match streamed {
                Some(p) => p,
                None => merge::plan(&model.graph, det, &stats, &m)?,
            };
            (plans, None)
        }
        (None, None) => {
            return Err(Error::Usage(
                "give --keep F or --experts M (merging), or --target-size F (compression)".into(),
            ))
        }
    };
    seconds.plan = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let (rewrites, written) = match written {
        Some((r, f)) => (r, Some(f)),
        None => (
            crate::emit::merged::rewrite(model, det, &plans, opts.emit)?,
            None,
        ),
    };
    model.graph.verify()?;
    seconds.emit = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let segmented = if let Some(f) = written {
        f
    } else if execution.segments && samples(&heldout) > 0 {
        match fidelity::measure_segmented(
            &original,
            det,
            &plans,
            opts.emit,
            &heldout,
            &run_options(opts),
        ) {
            Ok(f) => Some(f),
            Err(e) if !execution.whole_fits => return Err(e),
            Err(e) => {
                log::warn!("fidelity segment by segment failed ({e}); running the whole models");
                None
            }
        }
    } else {
        None
    };
    let fidelity = if samples(&heldout) == 0 {
        None
    } else if segmented.is_some() {
        segmented
    } else {
        Some(fidelity::measure(
            &original,
            det,
            model,
            &heldout,
            &run_options(opts),
        )?)
    };
    seconds.fidelity = t.elapsed().as_secs_f64();
    if let (Some(max), Some(f)) = (opts.max_error, &fidelity) {
        if f.rel_l2.is_nan() || f.rel_l2 > max {
            return Err(Error::Quality(format!(
                "held-out rel_l2 {:.4} exceeds --max-error {max}; nothing was written",
                f.rel_l2
            )));
        }
    }
    execution.activations_peak_bytes = crate::segment::peak_bytes();
    Ok(ReduceOutcome {
        calibration,
        layers: plans
            .into_iter()
            .map(|p| {
                let mut r = p.report;
                r.compression = p.compress;
                r
            })
            .collect(),
        compression,
        rewrites,
        fidelity,
        execution,
        seconds,
    })
}

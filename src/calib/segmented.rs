//! Calibration segment by segment: the model is cut at its blocks ([`crate::segment`]) and
//! the data flows through the segments one at a time, each block's statistics collected on
//! its own segment. No runtime ever holds more than one segment; the values between
//! segments wait on disk. The statistics are those of [`super::calibrate_on`] (same tokens,
//! same order, same reservoir draws), up to the runtimes' rounding.
use super::stats::{LayerAcc, LayerStats};
use super::{describe_source, fold, CalibOptions, CalibStats, Resilient};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use crate::segment::flow::{own_block, Flow};

/// Calibrates `model`'s identified blocks on `data` (first axis = samples), one segment in
/// the runtime at a time.
pub fn calibrate_segmented(
    model: &Model,
    det: &Detection,
    opts: &CalibOptions,
    data: &[(String, Value)],
) -> Result<CalibStats> {
    calibrate_segmented_with(model, det, opts, data, &mut |_, _, s| Ok(s))
}

/// What [`calibrate_segmented_with`] hands each block's statistics to, as soon as its segment
/// ran: the segment (the block's weights are its own), the block's detection in it, and the
/// block's statistics; it returns what is kept of them.
pub type OnLayer<'a> = dyn FnMut(&Model, &Detection, LayerStats) -> Result<LayerStats> + 'a;

/// [`calibrate_segmented`], each block's statistics passed through `on_layer` as soon as its
/// segment ran (the planner in bounded memory reduces them to what it needs there, so that
/// no more than one block's full statistics are ever held).
pub fn calibrate_segmented_with(
    model: &Model,
    det: &Detection,
    opts: &CalibOptions,
    data: &[(String, Value)],
    on_layer: &mut OnLayer,
) -> Result<CalibStats> {
    let blocks = det.identified_blocks();
    if blocks.is_empty() {
        return Err(Error::Usage(
            "no calibratable MoE block was detected".into(),
        ));
    }
    let cut = crate::segment::cut(model, det)?;
    let mut flow = Flow::new(&cut, data, opts.batch, 1)?;
    let samples = data.first().map_or(0, |(_, v)| v.shape()[0]);
    let mut layers = Vec::new();
    let (mut seconds_setup, mut seconds_run) = (0f64, 0f64);
    let mut runtimes: Vec<String> = Vec::new();
    let bar = crate::progress::count_bar(opts.progress, cut.segments.len() as u64, "segments");
    bar.set_message("calibrating segment by segment");
    let none = Detection::default();
    let last = cut.segments.len().saturating_sub(1);
    for (s, seg) in cut.segments.iter().enumerate() {
        let layer = seg
            .block
            .as_deref()
            .and_then(|name| blocks.iter().position(|b| b.name == name));
        let Some(li) = layer else {
            if s < last {
                flow.run(s, &seg.model, &none, opts)?;
            }
            bar.inc(1);
            continue;
        };
        let one = own_block(&seg.model, det, &blocks[li].name)?;
        let b = &one.blocks[0];
        let t = std::time::Instant::now();
        let mut session = Resilient::open(&seg.model, &one, vec![b], opts)?;
        seconds_setup += t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let mut acc = LayerAcc::new(&seg.model.graph, b, opts.stats.clone(), li)?;
        for k in 0..flow.batches() {
            let feed = flow.feed(k)?;
            let out = session.run(&feed, &format!("batch {k}"))?;
            let logits = session.logits()[0].clone();
            fold(&mut acc, b, &out, &feed, &logits)?;
            flow.store(s, k, &out)?;
        }
        flow.advance(s)?;
        seconds_run += t.elapsed().as_secs_f64();
        if !runtimes.iter().any(|r| r == session.runtime()) {
            runtimes.push(session.runtime().to_string());
        }
        drop(session);
        layers.push((li, on_layer(&seg.model, &one, acc.finish())?));
        model.release_mapped();
        bar.inc(1);
    }
    bar.finish_and_clear();
    layers.sort_by_key(|(li, _)| *li);
    if layers.len() != blocks.len() {
        return Err(Error::Graph {
            node: None,
            reason: format!(
                "internal: {} of {} blocks found in the segments",
                layers.len(),
                blocks.len()
            ),
        });
    }
    log::info!(
        "calibrated segment by segment: at most {:.1} MiB of activations on disk",
        flow.peak() as f64 / (1u64 << 20) as f64
    );
    Ok(CalibStats {
        runtime: runtimes.join(", "),
        source: format!("{}, segment by segment", describe_source(&opts.source)),
        samples,
        seconds_setup,
        seconds_run,
        layers: layers.into_iter().map(|(_, l)| l).collect(),
    })
}

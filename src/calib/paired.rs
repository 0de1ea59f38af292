//! Paired calibration (the sequential pipeline): one block's statistics on a model whose
//! earlier blocks are rewritten, with each sampled routed row kept beside the same token's
//! input to that block in the reference (original) model. Both models run on every batch;
//! refits then map what the block now receives to what the original block produced.
use super::session::Resilient;
use super::stats::LayerAcc;
use super::{slice, CalibOptions, CalibStats};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use ndarray::ArrayD;

/// Calibrates `det`'s single identified block on `current`, pairing its reservoir rows with
/// `reference`'s inputs to the same block (same data, same token order). `full` is
/// `reference`'s detection; `rest`, the blocks of `current` still as exported (re-emitted
/// when `current` cannot run as it is).
pub fn calibrate_paired(
    current: &Model,
    reference: &Model,
    det: &Detection,
    full: &Detection,
    rest: &Detection,
    opts: &CalibOptions,
    data: &[(String, Value)],
) -> Result<CalibStats> {
    let mut paired = Paired::open(current, rest, reference, full, det, opts)?;
    let samples = data.first().map_or(0, |(_, v)| v.shape()[0]);
    for start in (0..samples).step_by(opts.batch.max(1)) {
        let end = (start + opts.batch.max(1)).min(samples);
        let feed: Vec<(String, Value)> = data
            .iter()
            .map(|(k, v)| (k.clone(), slice(v, start, end)))
            .collect();
        paired.add(&feed, &feed)?;
    }
    Ok(paired.finish("paired with the original model"))
}

/// Paired calibration fed one batch at a time by the caller: [`Paired::add`] takes a batch's
/// values in the partially rewritten model and in the original, runs each model, and returns
/// the reference run's outputs (for segments: the next segment's inputs in the original).
pub struct Paired<'a> {
    block: &'a crate::moe::MoeBlock,
    cur: Resilient<'a>,
    /// The reference model's session; `None` when the reference is the current model itself
    /// (a segment paired with its own original form): one session then runs both feeds.
    refs: Option<Resilient<'a>>,
    acc: LayerAcc,
    samples: usize,
    batches: usize,
    seconds_setup: f64,
    t_run: std::time::Instant,
}

impl<'a> Paired<'a> {
    /// Opens `current` and `reference` with `det`'s single identified block instrumented.
    /// Each falls back on its own (a later layer of a shape-specialised export can fail once
    /// the earlier layers are rewritten), re-emitting its blocks in `current_reemit` /
    /// `reference_reemit`.
    pub fn open(
        current: &'a Model,
        current_reemit: &'a Detection,
        reference: &'a Model,
        reference_reemit: &'a Detection,
        det: &'a Detection,
        opts: &'a CalibOptions,
    ) -> Result<Self> {
        Self::open_with(
            current,
            current_reemit,
            Some((reference, reference_reemit)),
            det,
            opts,
        )
    }

    /// Like [`Paired::open`] with one model as both the current and the reference one (an
    /// original segment fed its inputs in the rewritten and in the original model): one
    /// session, so the segment's weights are held once.
    pub fn open_shared(
        model: &'a Model,
        reemit: &'a Detection,
        det: &'a Detection,
        opts: &'a CalibOptions,
    ) -> Result<Self> {
        Self::open_with(model, reemit, None, det, opts)
    }

    /// `reference`: the reference model and its re-emission, `None` for `current` itself.
    fn open_with(
        current: &'a Model,
        current_reemit: &'a Detection,
        reference: Option<(&'a Model, &'a Detection)>,
        det: &'a Detection,
        opts: &'a CalibOptions,
    ) -> Result<Self> {
        let blocks = det.identified_blocks();
        let [b] = blocks.as_slice() else {
            return Err(Error::Usage(
                "internal: paired calibration takes one block".into(),
            ));
        };
        let t_setup = std::time::Instant::now();
        let cur = Resilient::open(current, current_reemit, vec![b], opts)?;
        let refs = reference
            .map(|(m, r)| Resilient::open(m, r, vec![b], opts))
            .transpose()?;
        Ok(Paired {
            block: b,
            cur,
            refs,
            acc: LayerAcc::new(&current.graph, b, opts.stats.clone(), 0)?,
            samples: 0,
            batches: 0,
            seconds_setup: t_setup.elapsed().as_secs_f64(),
            t_run: std::time::Instant::now(),
        })
    }

    /// Adds one batch; returns the reference run's outputs.
    pub fn add(
        &mut self,
        feed: &[(String, Value)],
        feed_ref: &[(String, Value)],
    ) -> Result<Vec<(String, Value)>> {
        self.samples += feed.first().map_or(0, |(_, v)| v.shape()[0]);
        let what = format!("batch {}", self.batches);
        self.batches += 1;
        let out = self.cur.run(feed, &what)?;
        let out_ref = match self.refs.as_mut() {
            Some(r) => r.run(feed_ref, &what)?,
            None => self.cur.run(feed_ref, &what)?,
        };
        let logits = self.cur.logits()[0].clone();
        pair(
            &mut self.acc,
            self.block,
            &out,
            feed,
            &out_ref,
            feed_ref,
            &logits,
        )?;
        Ok(out_ref)
    }

    /// The statistics of every batch added; `source` describes the data.
    pub fn finish(self, source: &str) -> CalibStats {
        CalibStats {
            runtime: self.cur.runtime().into(),
            source: source.into(),
            samples: self.samples,
            seconds_setup: self.seconds_setup,
            seconds_run: self.t_run.elapsed().as_secs_f64(),
            layers: vec![self.acc.finish()],
        }
    }
}

/// Adds one batch to `acc`: block `b`'s inputs in the current run (`out`, else its feed),
/// the same tokens' inputs in the reference run, and the current router logits `logits`.
fn pair(
    acc: &mut LayerAcc,
    b: &crate::moe::MoeBlock,
    out: &[(String, Value)],
    feed: &[(String, Value)],
    out_ref: &[(String, Value)],
    feed_ref: &[(String, Value)],
    logits: &str,
) -> Result<()> {
    let h = b.hidden();
    let n = b.router.num_experts;
    let get = |out: &[(String, Value)], feed: &[(String, Value)], name: &str| {
        out.iter()
            .chain(feed.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_f32())
            .ok_or_else(|| Error::Tensor {
                tensor: name.to_string(),
                reason: "the runtime returned no such output".into(),
            })
    };
    let x = get(out, feed, &b.input)?;
    let x_ref = get(out_ref, feed_ref, &b.input)?;
    let z = get(out, feed, logits)?;
    let seq_len = if x.ndim() == 3 {
        x.shape()[1]
    } else {
        x.shape()[0]
    };
    let rows = x.len() / h;
    let shape = |a: ArrayD<f32>, c: usize, what: &str| {
        a.into_shape_with_order((rows, c))
            .map_err(|e| Error::Tensor {
                tensor: b.name.clone(),
                reason: format!("{what} is not [{rows} tokens, {c}]: {e}"),
            })
    };
    let (x, x_ref, z) = (
        shape(x, h, "block input")?,
        shape(x_ref, h, "reference block input")?,
        shape(z, n, "router logits")?,
    );
    let keep: Vec<bool> = match feed.iter().find(|(k, _)| k == "attention_mask") {
        Some((_, m)) if m.shape().iter().product::<usize>() == rows => {
            m.to_f32().iter().map(|&v| v != 0.0).collect()
        }
        _ => vec![true; rows],
    };
    acc.update_paired(x.view(), Some(x_ref.view()), z.view(), &keep, seq_len);
    Ok(())
}

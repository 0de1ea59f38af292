//! Fidelity segment by segment: the original and the rewritten model are never loaded whole.
//! Both are cut at the original's blocks ([`crate::segment`]); a rewritten segment is the
//! original segment with its block's plan written in (a rewrite touches its block's nodes
//! only, so the cuts are the same). The held-out data flows through the original segments
//! and through the rewritten ones side by side, one segment pair in the runtime at a time,
//! the values between segments waiting on disk. The model outputs of both flows give the
//! same metrics as the whole-model measurement (up to the runtimes' rounding); each rewritten
//! block's output is also compared at its cut.
use super::{BlockFidelity, Distance, Fidelity, Reference};
use crate::calib::{CalibOptions, Resilient};
use crate::emit::EmitForm;
use crate::error::Result;
use crate::merge::LayerPlan;
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use crate::segment::flow::{own_block, Flow};
use crate::segment::{Segment, Segmentation};
use ndarray::ArrayD;
use std::collections::HashSet;

/// A segment as cut and as rewritten by `plans` (the same model when no plan is for its
/// block), with the block detection to re-emit exactly if the original segment cannot run.
struct Pair {
    original: Model,
    rewritten: Option<Model>,
    reemit: Detection,
}

fn pair(seg: &Segment, det: &Detection, plans: &[LayerPlan], emit: EmitForm) -> Result<Pair> {
    let Some(name) = seg.block.as_deref() else {
        return Ok(Pair {
            original: seg.model.clone(),
            rewritten: None,
            reemit: Detection::default(),
        });
    };
    let mine: Vec<LayerPlan> = plans.iter().filter(|p| p.block == name).cloned().collect();
    let one = own_block(&seg.model, det, name);
    if mine.is_empty() {
        return Ok(Pair {
            original: seg.model.clone(),
            rewritten: None,
            reemit: one.unwrap_or_default(),
        });
    }
    let one = one?;
    let mut rewritten = seg.model.clone();
    crate::emit::merged::rewrite(&mut rewritten, &one, &mine, emit)?;
    Ok(Pair {
        original: seg.model.clone(),
        rewritten: Some(rewritten),
        reemit: one,
    })
}

/// Which runtimes ran the segments, and whether any original segment ran through the exact
/// re-emission.
#[derive(Default)]
struct Runs {
    runtimes: Vec<String>,
    reemitted: bool,
}

impl Runs {
    fn saw(&mut self, s: &Resilient, original: bool) {
        if !self.runtimes.iter().any(|r| r == s.runtime()) {
            self.runtimes.push(s.runtime().to_string());
        }
        self.reemitted |= original && s.reemitted();
    }

    fn label(&self) -> String {
        if self.reemitted {
            "original, segment by segment (some segments through the exact re-emission of \
             their block)"
                .into()
        } else {
            "original, segment by segment".into()
        }
    }
}

fn model_outputs(model: &Model) -> HashSet<String> {
    model
        .graph
        .outputs()
        .iter()
        .filter_map(|o| o.name.clone())
        .collect()
}

fn outputs_named<'a>(
    out: &'a [(String, Value)],
    names: &'a HashSet<String>,
) -> impl Iterator<Item = &'a (String, Value)> {
    out.iter().filter(move |(n, _)| names.contains(n))
}

fn mask(feed: &[(String, Value)]) -> Option<ArrayD<f32>> {
    feed.iter()
        .find(|(n, _)| n == "attention_mask")
        .map(|(_, v)| v.to_f32())
}

fn is_lm(data: &[(String, Value)]) -> bool {
    data.iter().any(|(n, _)| n == "input_ids")
}

/// Runs `original` and `original` rewritten by `plans` on `data` segment by segment and
/// measures the distance of their outputs, and of each rewritten block's output at its cut.
pub fn measure_segmented(
    original: &Model,
    det: &Detection,
    plans: &[LayerPlan],
    emit: EmitForm,
    data: &[(String, Value)],
    opts: &CalibOptions,
) -> Result<Fidelity> {
    let cut = crate::segment::cut(original, det)?;
    let mut m = Measure::new(original, &cut, data, opts)?;
    for (s, seg) in cut.segments.iter().enumerate() {
        let p = pair(seg, det, plans, emit)?;
        m.step(s, seg, det, &p.reemit, p.rewritten.as_ref())?;
        original.release_mapped();
    }
    m.finish()
}

/// The held-out measurement walked one segment at a time by its caller: the original and the
/// rewritten flows advance together (the sequential pipeline measures each segment as soon
/// as it is rewritten, so that no rewritten layer has to be kept for a later pass).
pub struct Measure {
    a: Flow,
    b: Flow,
    outputs: HashSet<String>,
    samples: usize,
    total: Distance,
    blocks: Vec<BlockFidelity>,
    runs: Runs,
    opts: CalibOptions,
}

impl Measure {
    /// A measurement of `data` over the segments of `cut` (of `original`).
    pub fn new(
        original: &Model,
        cut: &Segmentation,
        data: &[(String, Value)],
        opts: &CalibOptions,
    ) -> Result<Self> {
        Ok(Measure {
            a: Flow::new(cut, data, opts.batch, 2)?,
            b: Flow::new(cut, data, opts.batch, 2)?,
            outputs: model_outputs(original),
            samples: data.first().map_or(0, |(_, v)| v.shape()[0]),
            total: Distance::new(is_lm(data)),
            blocks: Vec::new(),
            runs: Runs::default(),
            opts: opts.clone(),
        })
    }

    /// Runs segment `s` (`seg`) on the original flow and `rewritten` (None: the segment as it
    /// is) on the rewritten flow. `reemit` is the segment's block detection, for the exact
    /// re-emission should the original segment not run.
    pub fn step(
        &mut self,
        s: usize,
        seg: &Segment,
        det: &Detection,
        reemit: &Detection,
        rewritten: Option<&Model>,
    ) -> Result<()> {
        let none = Detection::default();
        let opts = &self.opts;
        let mut sa = Resilient::open(&seg.model, reemit, vec![], opts)?;
        let mut sb = match rewritten {
            Some(m) => Resilient::open(m, &none, vec![], opts)?,
            None => Resilient::open(&seg.model, reemit, vec![], opts)?,
        };
        // The block output at the cut (as it crosses: float16 activations cross as float32).
        let block_out = seg
            .block
            .as_deref()
            .filter(|_| rewritten.is_some())
            .and_then(|name| det.blocks.iter().find(|x| x.name == name))
            .and_then(|x| seg.outputs.iter().find(|o| o.name == x.output));
        let mut at_cut = Distance::new(false);
        for k in 0..self.a.batches() {
            let (fa, fb) = (self.a.feed(k)?, self.b.feed(k)?);
            let what = format!("batch {k}");
            let (oa, ob) = (sa.run(&fa, &what)?, sb.run(&fb, &what)?);
            let m = mask(&fa);
            let (ya, yb): (Vec<_>, Vec<_>) = (
                outputs_named(&oa, &self.outputs).cloned().collect(),
                outputs_named(&ob, &self.outputs).cloned().collect(),
            );
            self.total.add(m.as_ref(), &ya, &yb)?;
            if let Some(port) = block_out {
                let only: HashSet<String> = [port.wire.clone()].into();
                let (xa, xb): (Vec<_>, Vec<_>) = (
                    outputs_named(&oa, &only).cloned().collect(),
                    outputs_named(&ob, &only).cloned().collect(),
                );
                at_cut.add(m.as_ref(), &xa, &xb)?;
            }
            self.a.store(s, k, &oa)?;
            self.b.store(s, k, &ob)?;
        }
        self.a.advance(s)?;
        self.b.advance(s)?;
        self.runs.saw(&sa, true);
        self.runs.saw(&sb, false);
        if let (Some(port), Some(name)) = (block_out, seg.block.as_deref()) {
            if !at_cut.is_empty() {
                self.blocks.push(BlockFidelity {
                    block: name.to_string(),
                    output: port.name.clone(),
                    rel_l2: at_cut.rel_l2(),
                    cosine: at_cut.cosine(),
                });
            }
        }
        Ok(())
    }

    /// [`Measure::step`] for a segment whose block (if any) is not rewritten: both flows run
    /// the original segment.
    pub fn step_unchanged(&mut self, s: usize, seg: &Segment, det: &Detection) -> Result<()> {
        let reemit = match seg.block.as_deref() {
            Some(b) => own_block(&seg.model, det, b).unwrap_or_default(),
            None => Detection::default(),
        };
        self.step(s, seg, det, &reemit, None)
    }

    /// The metrics, once every segment ran.
    pub fn finish(self) -> Result<Fidelity> {
        let mut f = self.total.finish(
            self.runs.runtimes.join(", "),
            self.runs.label(),
            self.samples,
        )?;
        f.blocks = self.blocks;
        Ok(f)
    }
}

/// The original's outputs on `data`, run segment by segment (cut as `cut`) (what
/// [`measure_segmented_against`] compares plans with).
pub fn reference_segmented(
    original: &Model,
    cut: &Segmentation,
    det: &Detection,
    data: &[(String, Value)],
    opts: &CalibOptions,
) -> Result<Reference> {
    let (outputs, runs) = flow_outputs(original, cut, det, &[], EmitForm::default(), data, opts)?;
    Ok(Reference {
        rt: opts.runtime,
        outputs,
        label: runs.label(),
    })
}

/// Runs `original` (cut as `cut`) rewritten by `plans` on `data` segment by segment and
/// measures the distance from `reference` (the original's outputs on the same data).
#[allow(clippy::too_many_arguments)]
pub fn measure_segmented_against(
    reference: &Reference,
    original: &Model,
    cut: &Segmentation,
    det: &Detection,
    plans: &[LayerPlan],
    emit: EmitForm,
    data: &[(String, Value)],
    opts: &CalibOptions,
) -> Result<Fidelity> {
    let samples = data.first().map_or(0, |(_, v)| v.shape()[0]);
    let (out, runs) = flow_outputs(original, cut, det, plans, emit, data, opts)?;
    let runtime = runs.runtimes.join(", ");
    super::compare(
        data,
        &reference.outputs,
        &out,
        runtime,
        reference.label.clone(),
        samples,
    )
}

/// Per batch, named values.
type Batches = Vec<Vec<(String, Value)>>;

/// Per batch, the model outputs of `original` rewritten by `plans` (none: as it is), run
/// segment by segment on `data`.
fn flow_outputs(
    original: &Model,
    cut: &Segmentation,
    det: &Detection,
    plans: &[LayerPlan],
    emit: EmitForm,
    data: &[(String, Value)],
    opts: &CalibOptions,
) -> Result<(Batches, Runs)> {
    let names = model_outputs(original);
    let mut flow = Flow::new(cut, data, opts.batch, 1)?;
    let mut out: Batches = vec![Vec::new(); flow.batches()];
    let mut runs = Runs::default();
    let none = Detection::default();
    for (s, seg) in cut.segments.iter().enumerate() {
        let p = pair(seg, det, plans, emit)?;
        let mut session = match &p.rewritten {
            Some(m) => Resilient::open(m, &none, vec![], opts)?,
            None => Resilient::open(&p.original, &p.reemit, vec![], opts)?,
        };
        for (k, got) in out.iter_mut().enumerate() {
            let o = session.run(&flow.feed(k)?, &format!("batch {k}"))?;
            got.extend(outputs_named(&o, &names).cloned());
            flow.store(s, k, &o)?;
        }
        flow.advance(s)?;
        runs.saw(&session, p.rewritten.is_none());
    }
    Ok((out, runs))
}

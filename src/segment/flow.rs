//! Data flowing through a model's segments one segment at a time: per batch, the values that
//! later segments read, kept on disk ([`ActivationCache`]) with one batch in memory at a
//! time, and deleted as soon as no later segment reads them. Model inputs stay to the end
//! (the attention mask tells every segment which tokens are padding).
use super::cache::ActivationCache;
use super::Segmentation;
use crate::calib::{slice, CalibOptions, Resilient};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::Value;
use std::collections::{HashMap, HashSet};

/// The values of some data at the current cut of a segmentation.
pub(crate) struct Flow {
    cache: ActivationCache,
    /// Flows of the same run that fill the same disk at the same time.
    flows: u64,
    /// Whether the room on disk was checked against the first stored activations.
    checked: bool,
    inputs: HashSet<String>,
    /// For every crossing tensor and model input: the last segment that reads it.
    last_read: HashMap<String, usize>,
}

impl Flow {
    /// `data` (first axis = samples) cut in batches of `batch` samples, at the start of `cut`;
    /// `flows` flows of the run (this one included) fill the disk at the same time.
    pub fn new(
        cut: &Segmentation,
        data: &[(String, Value)],
        batch: usize,
        flows: u64,
    ) -> Result<Self> {
        let batch = batch.max(1);
        let samples = data.first().map_or(0, |(_, v)| v.shape()[0]);
        let count = samples.div_ceil(batch);
        let mut cache = ActivationCache::new(count)?;
        for k in 0..count {
            let (start, end) = (k * batch, ((k + 1) * batch).min(samples));
            for (name, v) in data {
                cache.put(k, name, &slice(v, start, end))?;
            }
        }
        let mut last_read = HashMap::new();
        for (s, seg) in cut.segments.iter().enumerate() {
            for p in &seg.inputs {
                last_read.insert(p.wire.clone(), s);
            }
        }
        Ok(Flow {
            cache,
            flows: flows.max(1),
            checked: false,
            inputs: data.iter().map(|(k, _)| k.clone()).collect(),
            last_read,
        })
    }

    /// How many batches.
    pub fn batches(&self) -> usize {
        self.cache.batches()
    }

    /// Batch `k`'s values at the current cut (model inputs included).
    pub fn feed(&self, k: usize) -> Result<Vec<(String, Value)>> {
        self.cache.get(k)
    }

    /// Keeps, of segment `s`'s outputs `out` on batch `k`, those a later segment reads, and
    /// deletes the batch's values no later segment reads (segment `s` has consumed them).
    pub fn store(&mut self, s: usize, k: usize, out: &[(String, Value)]) -> Result<()> {
        let before = self.cache.bytes();
        for (name, v) in out {
            if self.last_read.get(name).is_some_and(|&l| l > s) {
                self.cache.put(k, name, v)?;
            }
        }
        let added = self.cache.bytes() - before;
        if added > 0 && !self.checked {
            self.checked = true;
            self.check_room(added)?;
        }
        let (inputs, last) = (&self.inputs, &self.last_read);
        self.cache.retain_batch(k, |name| {
            inputs.contains(name) || last.get(name).is_some_and(|&l| l > s)
        })
    }

    /// Segment `s` has run on every batch: deletes what no later segment reads.
    pub fn advance(&mut self, s: usize) -> Result<()> {
        let (inputs, last) = (&self.inputs, &self.last_read);
        self.cache
            .retain(|name| inputs.contains(name) || last.get(name).is_some_and(|&l| l > s))
    }

    /// Once the first activations of one batch are stored (`added` bytes): whether the disk
    /// has room for the run's flows at a cut, from that measured size, every batch. Later
    /// cuts carry about as much (the residual stream and its side tensors); half again is
    /// allowed for wider ones.
    fn check_room(&self, added: u64) -> Result<()> {
        let at_cut = added * self.batches() as u64;
        let need = (self.flows as f64 * 1.5 * at_cut as f64) as u64 - added;
        let dir = self.cache.dir();
        match super::cache::free_bytes(dir) {
            Some(free) if free < need => Err(Error::Usage(format!(
                "the activations between segments need about {} more on disk under {} \
                 ({} free; {} per flow at the first cut, measured on its first batch, {} \
                 flow(s)): point TMPDIR at a disk with room, or calibrate on fewer samples",
                crate::inspect::human_bytes(need),
                dir.parent().unwrap_or(dir).display(),
                crate::inspect::human_bytes(free),
                crate::inspect::human_bytes(at_cut),
                self.flows
            ))),
            _ => Ok(()),
        }
    }

    /// Runs segment `s` (`model`, the segment as cut or rewritten) on every batch, keeping
    /// what later segments read; `reemit` names its blocks to re-emit exactly if the graph
    /// as it is cannot run.
    pub fn run(
        &mut self,
        s: usize,
        model: &Model,
        reemit: &Detection,
        opts: &CalibOptions,
    ) -> Result<()> {
        let mut session = Resilient::open(model, reemit, vec![], opts)?;
        for k in 0..self.batches() {
            let out = session.run(&self.feed(k)?, &format!("batch {k}"))?;
            self.store(s, k, &out)?;
        }
        self.advance(s)
    }

    /// Bytes kept on disk now.
    pub fn bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// The most bytes the flow kept on disk at once.
    pub fn peak(&self) -> u64 {
        self.cache.peak
    }
}

/// The detection, in `segment`, of the whole model's block `name` (found by its output, and
/// named as in the whole model: plans name their blocks).
pub(crate) fn own_block(segment: &Model, det: &Detection, name: &str) -> Result<Detection> {
    let missing = || Error::Graph {
        node: Some(name.to_string()),
        reason: "the block is not recognised in its own segment".into(),
    };
    let whole = det
        .blocks
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(missing)?;
    let found = crate::moe::detect(&segment.graph);
    let here = found
        .blocks
        .iter()
        .find(|b| b.output == whole.output)
        .ok_or_else(missing)?;
    let mut one = found.only(&here.name).ok_or_else(missing)?;
    one.blocks[0].name = name.to_string();
    Ok(one)
}

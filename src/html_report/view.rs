//! What the HTML report reads from a `--report` JSON document: the keys it draws, each
//! optional, so that a report of any method (copy, merge, prune, compress) and of an earlier
//! version with fewer keys renders. Unknown keys are ignored.
use serde::Deserialize;
use std::collections::BTreeMap;

/// The report, as far as the page shows it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct View {
    pub input: String,
    pub output: String,
    pub method: Option<String>,
    pub params_before: u64,
    pub params_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub nodes_before: u64,
    pub nodes_after: u64,
    pub blocks_detected: u64,
    pub blocks: Vec<Block>,
    pub calibration: Option<Calibration>,
    pub layers: Vec<Layer>,
    pub compression: Option<Compression>,
    pub fidelity: Option<Fidelity>,
    pub seconds: BTreeMap<String, f64>,
}

/// One detected block and what happened to it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Block {
    pub block: String,
    pub rewritten: bool,
    pub skipped: Option<String>,
    pub semantics: Option<String>,
}

/// Where the calibration samples came from.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Calibration {
    pub runtime: String,
    pub source: String,
    pub samples_fit: u64,
    pub samples_heldout: u64,
    pub heldout_source: String,
    pub tokens: u64,
}

/// One reduced layer.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Layer {
    pub block: String,
    pub experts_before: usize,
    pub experts_after: usize,
    pub groups: Vec<Group>,
    pub dropped: Vec<usize>,
    pub compression: Option<LayerCompression>,
}

/// A merged (or kept) expert and the router experts it serves.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Group {
    pub expert: usize,
    pub members: Vec<usize>,
    pub frequencies: Vec<f64>,
}

/// How one layer was compressed.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LayerCompression {
    pub family: String,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub error: f64,
    pub flops_before: f64,
    pub flops_after: f64,
    pub matrices: Vec<Matrix>,
}

/// One stored matrix of a compressed layer.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Matrix {
    pub experts: Vec<usize>,
    pub matrix: String,
    pub form: String,
    pub rank: Option<usize>,
    pub neurons: Option<usize>,
    pub bytes: u64,
    pub error: f64,
}

/// The whole model's compression plan.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Compression {
    pub family: String,
    pub plan: String,
    pub pipeline: String,
    pub budget_bytes: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub fraction: f64,
    pub flops_before: f64,
    pub flops_after: f64,
    pub chosen_by: Vec<Alternative>,
}

/// A whole plan measured end to end against the others.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Alternative {
    pub plan: String,
    pub score: f64,
    pub metric: String,
    pub chosen: bool,
}

/// Held-out fidelity of the written model against the original.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Fidelity {
    pub runtime: String,
    pub reference: String,
    pub samples: u64,
    pub positions: u64,
    pub outputs: Vec<String>,
    pub rel_l2: f64,
    pub cosine: f64,
    pub top1_agreement: Option<f64>,
    pub kl: Option<f64>,
    pub blocks: Vec<BlockFidelity>,
}

/// One rewritten block's error at its own output.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BlockFidelity {
    pub block: String,
    pub output: String,
    pub rel_l2: f64,
    pub cosine: f64,
}

impl Layer {
    /// Each router expert's share of the routed tokens (`None` where the report has none).
    pub fn usage(&self) -> Vec<Option<f64>> {
        let mut out = vec![None; self.experts_before];
        for g in &self.groups {
            for (i, &m) in g.members.iter().enumerate() {
                if let (Some(slot), Some(&f)) = (out.get_mut(m), g.frequencies.get(i)) {
                    *slot = Some(f);
                }
            }
        }
        out
    }

    /// For each router expert, the index of its group in `groups` (`None`: dropped).
    pub fn group_of(&self) -> Vec<Option<usize>> {
        let mut out = vec![None; self.experts_before];
        for (gi, g) in self.groups.iter().enumerate() {
            for &m in &g.members {
                if let Some(slot) = out.get_mut(m) {
                    *slot = Some(gi);
                }
            }
        }
        out
    }
}

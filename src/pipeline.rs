//! The main job: load, run the passes, verify, save.
use crate::error::{Error, Result};
use crate::model::Model;
use crate::onnx::{SaveOptions, SaveSummary};
use serde::Serialize;
use std::path::Path;

/// What to do to the detected MoE blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Re-emit every block in smoe-opt's canonical form with the same experts (exact).
    None,
    /// MC-SMoE's merge step (router-logit groups, weight-matching alignment, frequency-weighted).
    MSmoe,
    /// HC-SMoE (average-linkage clusters of mean expert outputs).
    HcSmoe,
    /// Keep the most-used experts (router rows of the others deleted).
    PruneFrequency,
    /// Keep the experts with the highest REAP score.
    PruneReap,
    /// Uniform average of router-logit groups, no alignment.
    Average,
}

impl Method {
    /// The merging/pruning method, for every method but `none`.
    pub fn reduction(self) -> Option<crate::merge::MergeMethod> {
        use crate::merge::MergeMethod as M;
        match self {
            Method::None => None,
            Method::MSmoe => Some(M::MSmoe),
            Method::HcSmoe => Some(M::HcSmoe),
            Method::PruneFrequency => Some(M::PruneFrequency),
            Method::PruneReap => Some(M::PruneReap),
            Method::Average => Some(M::Average),
        }
    }
}

/// Options of one pipeline run.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// How to write the output.
    pub save: SaveOptions,
    /// The transformation; `None` copies the model through unchanged.
    pub method: Option<Method>,
    /// Form of re-emitted blocks.
    pub emit: crate::emit::EmitForm,
    /// Merging/pruning options (methods other than `none`).
    pub reduce: Option<crate::reduce::ReduceOptions>,
}

/// Result of a pipeline run.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PipelineReport {
    /// Input model.
    pub input: String,
    /// Output model.
    pub output: String,
    /// Method applied.
    pub method: Option<Method>,
    /// Parameters (initializer elements) before.
    pub params_before: u64,
    /// Parameters after.
    pub params_after: u64,
    /// Bytes on disk before (model + external data).
    pub bytes_before: u64,
    /// Bytes on disk after.
    pub bytes_after: u64,
    /// What was written.
    pub saved: SaveSummary,
    /// Nodes before and after.
    pub nodes_before: usize,
    /// Nodes after.
    pub nodes_after: usize,
    /// MoE blocks detected.
    pub blocks_detected: usize,
    /// What happened to each block.
    pub blocks: Vec<crate::emit::BlockRewrite>,
    /// Calibration, per-layer groups and measured fidelity (merging/pruning).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub reduce: Option<crate::reduce::ReduceOutcome>,
}

/// The JSON Schema of the `--report` file, generated from the Rust types (committed as
/// `schemas/report.schema.json`; new keys may be added, existing keys keep their meaning).
pub fn report_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PipelineReport)).expect("a schema serialises")
}

/// Runs the pipeline from `input` to `output`.
pub fn run(input: &Path, output: &Path, opts: &PipelineOptions) -> Result<PipelineReport> {
    if crate::fsutil::same_file(input, output) {
        return Err(Error::Usage(format!(
            "output {} is the input file; smoe-opt never overwrites its input",
            output.display()
        )));
    }
    let mut model = Model::load(input)?;
    model.graph.verify().map_err(|e| Error::Input {
        path: input.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bytes_before = bytes_on_disk(input, &model);
    let params_before = params(&model);
    let nodes_before = model.graph.node_count();
    let det = crate::moe::detect(&model.graph);
    for d in &det.diagnostics {
        log::warn!("{d}");
    }
    let mut reduced = None;
    let blocks = match opts.method {
        None => vec![],
        Some(Method::None) => crate::emit::reemit(&mut model, &det, opts.emit)?,
        Some(_) => {
            let r = opts
                .reduce
                .as_ref()
                .ok_or_else(|| Error::Usage("merging needs --experts M or --keep F".into()))?;
            let out = crate::reduce::reduce(&mut model, &det, r)?;
            let blocks = det
                .blocks
                .iter()
                .map(|b| {
                    out.rewrites
                        .iter()
                        .find(|r| r.block == b.name)
                        .cloned()
                        .unwrap_or_else(|| crate::emit::BlockRewrite {
                            block: b.name.clone(),
                            rewritten: false,
                            skipped: Some("not selected, or experts not identified".into()),
                            nodes_removed: 0,
                            nodes_added: 0,
                            logits: None,
                            semantics: None,
                            quantization: None,
                        })
                })
                .collect();
            reduced = Some(out);
            blocks
        }
    };
    model.graph.verify()?;
    let saved = model.save(output, &opts.save)?;
    Ok(PipelineReport {
        input: input.display().to_string(),
        output: output.display().to_string(),
        method: opts.method,
        params_before,
        params_after: params(&model),
        bytes_before,
        bytes_after: saved.total_bytes(),
        saved,
        nodes_before,
        nodes_after: model.graph.node_count(),
        blocks_detected: det.blocks.len(),
        blocks,
        reduce: reduced,
    })
}

/// Parameters (elements of every initializer) of a model.
pub fn params(model: &Model) -> u64 {
    model
        .graph
        .initializers()
        .map(|i| {
            i.proto
                .dims
                .iter()
                .map(|&d| d.max(0) as u64)
                .product::<u64>()
        })
        .sum()
}

/// Bytes of a model on disk: the file plus every external data file it references.
pub fn bytes_on_disk(path: &Path, model: &Model) -> u64 {
    let mut total = std::fs::metadata(path).map_or(0, |m| m.len());
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut seen = std::collections::BTreeSet::new();
    for i in model.graph.initializers() {
        for kv in &i.proto.external_data {
            if kv.key.as_deref() == Some("location") {
                if let Some(loc) = &kv.value {
                    if seen.insert(loc.clone()) {
                        total += std::fs::metadata(dir.join(loc)).map_or(0, |m| m.len());
                    }
                }
            }
        }
    }
    total
}

impl PipelineReport {
    /// The printed summary table.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let pct = |a: u64, b: u64| 100.0 * (1.0 - b as f64 / a.max(1) as f64);
        let _ = writeln!(
            s,
            "params  {:>12} -> {:>12}  ({:.1}% smaller)",
            self.params_before,
            self.params_after,
            pct(self.params_before, self.params_after)
        );
        let _ = writeln!(
            s,
            "bytes   {:>12} -> {:>12}  ({:.1}% smaller)",
            self.bytes_before,
            self.bytes_after,
            pct(self.bytes_before, self.bytes_after)
        );
        if let Some(r) = &self.reduce {
            let _ = writeln!(
                s,
                "calibration: {} samples fitted ({} tokens, {}), {} held out ({})",
                r.calibration.samples_fit,
                r.calibration.tokens,
                r.calibration.runtime,
                r.calibration.samples_heldout,
                r.calibration.heldout_source
            );
            let _ = writeln!(
                s,
                "{:<10} {:>7} {:>7}  {:<10} groups",
                "layer", "experts", "after", "align gain"
            );
            for l in &r.layers {
                let groups: Vec<String> = l
                    .groups
                    .iter()
                    .map(|g| {
                        let m: Vec<String> = g.members.iter().map(usize::to_string).collect();
                        format!("{{{}}}", m.join(","))
                    })
                    .collect();
                let gain = l
                    .alignment
                    .as_ref()
                    .map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a.gain));
                let _ = writeln!(
                    s,
                    "{:<10} {:>7} {:>7}  {:<10} {}",
                    l.block,
                    l.experts_before,
                    l.experts_after,
                    gain,
                    groups.join(" ")
                );
            }
            if let Some(c) = &r.compression {
                let _ = writeln!(
                    s,
                    "compression ({}): {} -> {} expert bytes ({:.1}% of {}, budget {}), routed MACs/token {:.0} -> {:.0}",
                    c.plan,
                    c.bytes_before,
                    c.bytes_after,
                    100.0 * c.fraction,
                    c.bytes_before,
                    c.budget_bytes,
                    c.flops_before,
                    c.flops_after
                );
                for a in c.chosen_by.iter().flatten() {
                    let _ = writeln!(
                        s,
                        "  {} {:<60} {} {:.5}",
                        if a.chosen { "*" } else { " " },
                        a.plan,
                        a.metric,
                        a.score
                    );
                }
                let _ = writeln!(
                    s,
                    "{:<10} {:<28} {:>10} {:>10} {:>9}  ranks / neurons",
                    "layer", "written", "bytes", "after", "error"
                );
                for l in &r.layers {
                    if let Some(lc) = &l.compression {
                        let mut forms: Vec<String> = lc
                            .matrices
                            .iter()
                            .filter_map(|m| {
                                m.rank
                                    .map(|r| format!("{}:{r}", m.matrix))
                                    .or(m.neurons.map(|n| format!("{}:{n}n", m.matrix)))
                            })
                            .collect();
                        if forms.len() > 6 {
                            let more = forms.len() - 6;
                            forms.truncate(6);
                            forms.push(format!("(+{more})"));
                        }
                        let _ = writeln!(
                            s,
                            "{:<10} {:<28} {:>10} {:>10} {:>9.4}  {}",
                            l.block,
                            lc.family,
                            lc.bytes_before,
                            lc.bytes_after,
                            lc.error,
                            forms.join(" ")
                        );
                    }
                }
            }
            for b in &self.blocks {
                if let Some(q) = &b.quantization {
                    let _ = writeln!(
                        s,
                        "{}: QMoE int{}/int{} kept; requantising added {:.2}% RMS weight error \
                         (the original quantisation: ~{:.2}%)",
                        b.block,
                        q.bits[0],
                        q.bits[1],
                        100.0 * q.added_rel_rms,
                        100.0 * q.original_rel_rms
                    );
                }
            }
            match &r.fidelity {
                Some(f) => {
                    let _ = write!(
                        s,
                        "fidelity on {} held-out samples ({} positions, {}): rel_l2 {:.4}, cosine {:.4}",
                        f.samples, f.positions, f.runtime, f.rel_l2, f.cosine
                    );
                    if let (Some(t), Some(k)) = (f.top1_agreement, f.kl) {
                        let _ = write!(s, ", top-1 agreement {:.4}, KL {:.4}", t, k);
                    }
                    let _ = writeln!(s);
                }
                None => {
                    let _ = writeln!(s, "fidelity: not measured (no held-out samples: give --eval-data FILE.npz, or at least 2 calibration samples with --holdout > 0)");
                }
            }
        }
        s
    }
}

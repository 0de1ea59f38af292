//! The main job: load, run the passes, verify, save.
use crate::error::{Error, Result};
use crate::model::Model;
use crate::onnx::{SaveOptions, SaveSummary};
use std::path::Path;

/// What to do to the detected MoE blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Re-emit every block in smoe-opt's canonical form with the same experts (exact).
    None,
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
}

/// Result of a pipeline run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineReport {
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
    model.graph.verify()?;
    let nodes_before = model.graph.node_count();
    let det = crate::moe::detect(&model.graph);
    for d in &det.diagnostics {
        log::warn!("{d}");
    }
    let blocks = match opts.method {
        None => vec![],
        Some(Method::None) => crate::emit::reemit(&mut model, &det, opts.emit)?,
    };
    model.graph.verify()?;
    let saved = model.save(output, &opts.save)?;
    Ok(PipelineReport {
        saved,
        nodes_before,
        nodes_after: model.graph.node_count(),
        blocks_detected: det.blocks.len(),
        blocks,
    })
}

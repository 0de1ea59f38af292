//! The main job: load, run the passes, verify, save.
use crate::error::{Error, Result};
use crate::model::Model;
use crate::onnx::{SaveOptions, SaveSummary};
use std::path::Path;

/// Options of one pipeline run.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// How to write the output.
    pub save: SaveOptions,
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
}

/// Runs the pipeline from `input` to `output`.
pub fn run(input: &Path, output: &Path, opts: &PipelineOptions) -> Result<PipelineReport> {
    if crate::fsutil::same_file(input, output) {
        return Err(Error::Usage(format!(
            "output {} is the input file; smoe-opt never overwrites its input",
            output.display()
        )));
    }
    let model = Model::load(input)?;
    model.graph.verify()?;
    let nodes_before = model.graph.node_count();
    let saved = model.save(output, &opts.save)?;
    Ok(PipelineReport {
        saved,
        nodes_before,
        nodes_after: model.graph.node_count(),
    })
}

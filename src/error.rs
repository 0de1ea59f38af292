//! Typed errors of the library. Every variant names the file, node or tensor at fault.
//!
//! Exit codes of the command line ([`Error::exit_code`]): 2 for what the caller can fix by
//! asking differently ([`Error::Usage`], [`Error::Data`], [`Error::Stats`]), 1 for every
//! other failure (unreadable or malformed files, graphs, runtimes, writes, the quality
//! gate).
use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, rewriting or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file the operation was on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed ONNX protobuf.
    #[error("{path}: not a valid ONNX model: {reason}")]
    Decode {
        /// The model file.
        path: PathBuf,
        /// What the decoder or the structural check said.
        reason: String,
    },
    /// An input file other than the model (calibration data, statistics, tokenizer, text) is
    /// unreadable or malformed.
    #[error("{path}: {reason}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor's external data reference is unsafe or inconsistent.
    #[error("{path}: tensor '{tensor}': external data: {reason}")]
    ExternalData {
        /// The model file holding the reference.
        path: PathBuf,
        /// The tensor whose data is referenced.
        tensor: String,
        /// What is wrong with the reference.
        reason: String,
    },
    /// A tensor's declared shape or type disagrees with its data.
    #[error("tensor '{tensor}': {reason}")]
    Tensor {
        /// The tensor at fault.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The graph violates a structural invariant (see [`crate::ir::Graph::verify`]).
    #[error("graph check failed{}: {reason}", node.as_ref().map(|n| format!(" at node '{n}'")).unwrap_or_default())]
    Graph {
        /// The node at fault, when there is one.
        node: Option<String>,
        /// The violated invariant.
        reason: String,
    },
    /// A runtime (tract or onnxruntime) failed to load, compile or run a model.
    #[error("{runtime}: {stage}: {reason}")]
    Runtime {
        /// `tract` or `onnxruntime`.
        runtime: &'static str,
        /// What it was doing (loading, optimising, running, …).
        stage: String,
        /// What it said.
        reason: String,
    },
    /// A patch could not be applied; the graph is left unchanged.
    #[error("patch '{label}' rejected: {reason}")]
    Patch {
        /// The patch's label (usually the pass that built it).
        label: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The model cannot be written as requested.
    #[error("{path}: cannot write: {reason}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The rewritten model moved further from the original than allowed (`--max-error`).
    #[error("{0}")]
    Quality(String),
    /// Calibration or evaluation data does not fit the model: a missing or misshapen input
    /// array, token ids outside the vocabulary, too few samples, a batch too large for
    /// memory. Exit code 2: run again with other data or flags.
    #[error("{0}")]
    Data(String),
    /// Routing statistics (`--stats`, or those calibration produced) do not fit the model or
    /// lack what the method needs: another model's statistics, missing layers or samples.
    /// Exit code 2: calibrate this model.
    #[error("{0}")]
    Stats(String),
    /// The caller asked for something invalid (flags, paths). Exit code 2.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The command line's exit code for this error: 2 for usage, data and statistics that
    /// do not fit, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Data(_) | Error::Stats(_) => 2,
            _ => 1,
        }
    }

    /// Wraps an I/O error with the file it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

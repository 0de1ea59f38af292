//! smoe-opt: MC-SMoE ("Merge, Then Compress") for Sparse Mixture-of-Experts models,
//! as an ONNX-to-ONNX compiler pass.
//!
//! The library reads ONNX models exactly ([`Model::load`]), exposes the main graph as an
//! IR mutated only through patches ([`ir::Graph`], [`ir::Patch`]), and writes models
//! back inline or with external data ([`Model::save`]).
//!
//! # Guide
//!
//! A run goes through five steps; `examples/library.rs` does each of them on the bundled
//! language model and writes the same bytes as the command line.
//!
//! 1. **Load**: [`Model::load`] parses the protobuf and maps external data.
//! 2. **Detect**: [`moe::detect`] finds every MoE block (router + experts) the exporters
//!    write — per-expert chains, stacked 3-D experts, dense all-expert forms,
//!    `com.microsoft.MoE`/`QMoE` — as [`moe::MoeBlock`]s with exact router semantics.
//! 3. **Calibrate**: [`calib::calibrate`] runs data ([`calib::Source`]: .npz, text with a
//!    tokenizer, random tokens) through a runtime ([`runtime`]: tract, onnxruntime) and
//!    collects each layer's routing statistics ([`calib::CalibStats`]; [`calib::save`] and
//!    [`calib::load`] keep them on disk).
//! 4. **Reduce**: [`reduce::reduce`] merges experts ([`merge`], the passes in [`passes`])
//!    and/or compresses them under a byte budget ([`compress`]), rewrites the blocks
//!    ([`emit`]) and measures the written model against the original on held-out data
//!    ([`fidelity`]). [`reduce::ReduceOptions::new`] starts from the command line's defaults.
//! 5. **Save**: [`Model::save`] writes atomically, with external data when needed.
//!
//! [`pipeline::run`] does all five from file to file and returns the report that
//! `--report` writes; [`html_report`] draws it as an HTML page; [`cli`] is the command
//! line itself (the binary and the Python package both call it).
#![warn(missing_docs)]

pub mod calib;
pub mod cli;
pub mod compress;
pub mod dry_run;
pub mod emit;
pub mod error;
pub mod eval;
pub mod fidelity;
pub mod fsutil;
pub mod html_report;
pub mod inputs;
pub mod inspect;
pub mod ir;
pub mod linalg;
pub mod merge;
mod model;
pub mod moe;
pub mod onnx;
pub mod pipeline;
pub mod progress;
pub mod reduce;
pub mod runtime;
pub mod segment;
pub mod sequential;

#[path = "../passes/mod.rs"]
pub mod passes;

pub use error::{Error, Result};
pub use model::Model;

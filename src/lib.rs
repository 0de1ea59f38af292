//! smoe-opt: MC-SMoE ("Merge, Then Compress") for Sparse Mixture-of-Experts models,
//! as an ONNX-to-ONNX compiler pass.
//!
//! The library reads ONNX models exactly ([`Model::load`]), exposes the main graph as an
//! IR mutated only through patches ([`ir::Graph`], [`ir::Patch`]), and writes models
//! back inline or with external data ([`Model::save`]).
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

//! The pass catalogue: one file per pass, named verb_object.rs, each opening with a header
//! that says what it does, its preconditions and limits.
//!
//! Passes are pure functions of the graph, the detected blocks and calibration statistics;
//! they never call a runtime. So far: the MC-SMoE building blocks (budget, grouping,
//! weighted merge, permutation). Alignment, compression, emission of merged experts and the
//! named pipelines come with issue 5.

pub mod group_experts;
pub mod merge_experts;
pub mod plan_budget;

/// Names of the passes, in pipeline order.
pub const PASSES: &[&str] = &["plan_budget", "group_experts", "merge_experts"];

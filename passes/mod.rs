//! The pass catalogue: one file per pass, named verb_object.rs, each opening with a header
//! that says what it does, its preconditions and limits.
//!
//! Passes are pure functions of the graph, the detected blocks and calibration statistics;
//! they never call a runtime. The named pipelines that chain them live in `src/merge.rs` (merging) and
//! `src/compress.rs` (compression).

pub mod align_experts;
pub mod allocate_ranks;
pub mod base_delta;
pub mod cluster_outputs;
pub mod group_experts;
pub mod merge_experts;
pub mod plan_budget;
pub mod prune_experts;
pub mod prune_neurons;
pub mod refit_down;

/// Names of the passes, in pipeline order.
pub const PASSES: &[&str] = &[
    "plan_budget",
    "group_experts",
    "cluster_outputs",
    "align_experts",
    "merge_experts",
    "prune_experts",
    "allocate_ranks",
    "base_delta",
    "prune_neurons",
    "refit_down",
];

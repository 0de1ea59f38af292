//! The pass catalogue: one file per pass, named verb_object.rs, each opening with a header
//! that says what it does, its preconditions and limits.
//!
//! Passes are pure functions of the graph, the detected blocks and calibration statistics;
//! they never call a runtime. The named pipelines that chain them live in `src/merge.rs`.

pub mod align_experts;
pub mod cluster_outputs;
pub mod group_experts;
pub mod merge_experts;
pub mod plan_budget;
pub mod prune_experts;

/// Names of the passes, in pipeline order.
pub const PASSES: &[&str] = &[
    "plan_budget",
    "group_experts",
    "cluster_outputs",
    "align_experts",
    "merge_experts",
    "prune_experts",
];

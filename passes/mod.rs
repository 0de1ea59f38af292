//! The pass catalogue: one file per pass, each opening with a header that says what it
//! does, its preconditions and limits.
//!
//! The foundation release has no transforming pass yet: the pipeline loads, verifies and
//! saves. Passes (MoE detection, grouping, alignment, merging, compression) are added
//! here one file each, and registered in [`PASSES`].

/// Names of the passes the pipeline knows, in pipeline order.
pub const PASSES: &[&str] = &[];

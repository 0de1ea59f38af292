//! Graph IR: arena graph with use-def maps, patches, verification, and a builder.
pub mod builder;
mod graph;
mod patch;
mod prune;
pub mod types;

pub use graph::{node_attr, node_label, Graph, Initializer, NodeId};
pub use patch::Patch;
pub use prune::prune;

//! Graph IR: arena graph with use-def maps, patches, verification, and a builder.
pub mod builder;
mod graph;
mod patch;

pub use graph::{node_label, Graph, Initializer, NodeId};
pub use patch::Patch;

//! MoE block detection: the canonical [`MoeBlock`] and one recogniser per exporter form.
//!
//! Recognition is structural, never by tensor names: a router anchor (TopK/ArgMax over
//! softmax/sigmoid scores of a MatMul with a constant weight), the block region from the
//! hidden states to the single value every path leaves through, and the expert weights
//! on the paths inside it (see `region`, `router`, `experts`, `fused`).
pub mod block;
pub mod consts;
mod detect;
mod experts;
mod fused;
pub mod proj;
pub mod quant;
mod region;
mod router;
pub mod view;
pub mod weights;

pub use block::{
    Act, Expert, Ffn, Form, Groups, MoeBlock, Router, Scoring, SharedExpert, WeightRef,
};
pub use detect::{detect, Detection, NearMiss};
pub use fused::Layout;

//! ONNX file I/O: generated protobuf types, loading, saving, external data.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod proto;

pub mod dtype;
pub mod external;
mod load;
mod save;
pub mod spill;
pub mod tensor;
pub mod walk;

pub use external::{ExternalFile, ExternalStore};
pub use save::{SaveOptions, SaveSummary, PROTOBUF_LIMIT};

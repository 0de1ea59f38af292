//! Runtimes that execute models: tract (embedded, default) and onnxruntime (through `ort`,
//! shared library found at run time). Passes never call a runtime; calibration, fidelity and
//! eval do, and open their sessions through [`open`]/[`open_in`] (`select.rs`: the policy).
mod bounds;
mod npy_half;
pub mod npz_check;
#[cfg(feature = "ort")]
pub mod ort;
mod select;
#[cfg(feature = "tract")]
pub mod tract;

use crate::error::{Error, Result};
pub use bounds::IndexBounds;
use ndarray::ArrayD;
pub use select::{candidates, install_hint, last_error, open, open_in, ort_available, Ep, Runtime};
use std::path::Path;

/// A tensor passed to or returned by a runtime.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// float32.
    F32(ArrayD<f32>),
    /// int64.
    I64(ArrayD<i64>),
}

impl Value {
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(a) => a.shape(),
            Value::I64(a) => a.shape(),
        }
    }

    /// The float data, converting integers.
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            Value::F32(a) => a.clone(),
            Value::I64(a) => a.mapv(|v| v as f32),
        }
    }
}

/// How a runtime receives a model: in memory below the 2 GiB protobuf limit (for
/// onnxruntime, with the input's external weights left as references it maps), else as a
/// model file with one external data file in a temporary folder (`TMPDIR`; it takes the
/// model's size on disk while the runtime loads it). `SMOE_RUNTIME_INLINE_LIMIT` (bytes)
/// lowers the threshold (a test knob).
pub enum ModelSource {
    /// The encoded model.
    Bytes(Vec<u8>),
    /// The encoded model whose tensors in the original model's external data files stay
    /// references to them, relative to `folder` (see [`crate::Model::to_bytes_referencing`]).
    Referencing {
        /// The encoded model.
        bytes: Vec<u8>,
        /// The folder the references are relative to.
        folder: std::path::PathBuf,
    },
    /// A model file (and its data file) in a temporary folder, removed on drop.
    File {
        /// The folder.
        dir: tempfile::TempDir,
        /// The model file inside it.
        path: std::path::PathBuf,
    },
}

/// The form in which `model` should be handed to a runtime; `references`: whether the
/// runtime reads external data files itself (then the original's weights stay where they
/// are: [`ModelSource::Referencing`]).
pub fn model_source(model: &crate::Model, references: bool) -> Result<ModelSource> {
    let limit = std::env::var("SMOE_RUNTIME_INLINE_LIMIT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(crate::onnx::PROTOBUF_LIMIT);
    if references && model.referencing_len() <= limit {
        let (bytes, folder) = model.to_bytes_referencing()?;
        return Ok(match folder {
            Some(folder) => ModelSource::Referencing { bytes, folder },
            None => ModelSource::Bytes(bytes),
        });
    }
    if model.inline_len() <= limit {
        let bytes = model.to_inline_bytes()?;
        // The weights just copied were read through the mapping: out of the resident set.
        model.release_mapped();
        return Ok(ModelSource::Bytes(bytes));
    }
    let dir = tempfile::Builder::new()
        .prefix("smoe-opt-runtime")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let path = dir.path().join("model.onnx");
    log::info!(
        "the model is too large to pass in memory; writing it to {} for the runtime",
        path.display()
    );
    model.save(
        &path,
        &crate::onnx::SaveOptions {
            external_data: true,
            ..Default::default()
        },
    )?;
    Ok(ModelSource::File { dir, path })
}

/// A loaded model ready to run.
pub trait Session {
    /// The runtime's name.
    fn runtime(&self) -> &'static str;
    /// Input names, in model order.
    fn inputs(&self) -> Vec<String>;
    /// Output names, in model order.
    fn outputs(&self) -> Vec<String>;
    /// Runs the model on named inputs (every model input must be given).
    fn run(&mut self, inputs: &[(String, Value)]) -> Result<Vec<(String, Value)>>;
}

/// Refuses a run whose token inputs (`int64 [batch, seq]`) would need more memory than is
/// available for a single `[batch, seq, seq]` float32 attention-score matrix: a lower bound
/// of what any attention layer allocates. Without it a long `--seq-len` ends in an
/// allocation failure (an abort) inside the runtime.
pub fn check_memory(inputs: &[(String, Value)]) -> Result<()> {
    let Some(avail) = crate::inputs::available_memory() else {
        return Ok(());
    };
    for (name, v) in inputs {
        let (Value::I64(_), [b, s]) = (v, v.shape()) else {
            continue;
        };
        let need = (*b as u128) * (*s as u128) * (*s as u128) * 4;
        if need > avail as u128 {
            return Err(Error::Data(format!(
                "input '{name}' is a batch of {b} x {s} tokens: one attention-score matrix alone \
                 takes {:.1} GiB, {:.1} GiB of memory is available; lower --seq-len or --batch",
                need as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(())
}

/// The value named `name` among `inputs` (for a session feeding its declared inputs).
pub fn input<'a>(inputs: &'a [(String, Value)], name: &str) -> Result<&'a Value> {
    inputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::Data(format!("input '{name}' was not given")))
}

/// The array names of an `.npz` file (without `.npy`), read from its directory only.
pub fn npz_names(path: &Path) -> Result<Vec<String>> {
    let f = crate::inputs::open_regular(path)?;
    let mut npz = ndarray_npy::NpzReader::new(f).map_err(|e| Error::Input {
        path: path.to_path_buf(),
        reason: format!("not an .npz archive: {e}"),
    })?;
    let names = npz.names().map_err(|e| Error::Input {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(names
        .into_iter()
        .map(|n| n.trim_end_matches(".npy").to_string())
        .collect())
}

/// Reads every array of an `.npz` file (float32, float64, float16 → f32, int64, int32 → i64,
/// bool/uint8 → i64), keyed by name without `.npy`.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Value)>> {
    let err = |reason: String| Error::Input {
        path: path.to_path_buf(),
        reason,
    };
    npz_check::check(path)?;
    let f = crate::inputs::open_regular(path)?;
    let mut npz =
        ndarray_npy::NpzReader::new(f).map_err(|e| err(format!("not an .npz archive: {e}")))?;
    let names = npz.names().map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for n in names {
        let key = n.trim_end_matches(".npy").to_string();
        macro_rules! try_as {
            ($t:ty, $wrap:expr) => {
                if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<$t>, ndarray::IxDyn>(&n) {
                    out.push((key, $wrap(a)));
                    continue;
                }
            };
        }
        try_as!(f32, Value::F32);
        try_as!(f64, |a: ArrayD<f64>| Value::F32(a.mapv(|v| v as f32)));
        try_as!(npy_half::F16, |a: ArrayD<npy_half::F16>| Value::F32(
            a.mapv(|v| v.0.to_f32())
        ));
        try_as!(i64, Value::I64);
        try_as!(i32, |a: ArrayD<i32>| Value::I64(a.mapv(i64::from)));
        try_as!(bool, |a: ArrayD<bool>| Value::I64(a.mapv(i64::from)));
        try_as!(u8, |a: ArrayD<u8>| Value::I64(a.mapv(i64::from)));
        return Err(err(format!(
            "array '{key}' has an unsupported element type"
        )));
    }
    Ok(out)
}

/// Largest relative difference `max|a-b| / max|b|` between two arrays of equal shape.
pub fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

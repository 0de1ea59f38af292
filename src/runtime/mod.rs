//! Runtimes that execute models: tract (embedded, default) and onnxruntime (planned,
//! through `ort`). Passes never call a runtime; calibration and verification do.
#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "tract")]
pub mod tract;

use crate::error::{Error, Result};
use ndarray::ArrayD;
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

/// The value named `name` among `inputs` (for a session feeding its declared inputs).
pub fn input<'a>(inputs: &'a [(String, Value)], name: &str) -> Result<&'a Value> {
    inputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::Usage(format!("input '{name}' was not given")))
}

/// Reads every array of an `.npz` file (float32, float64 → f32, int64, int32 → i64,
/// bool/uint8 → i64), keyed by name without `.npy`.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Value)>> {
    let err = |reason: String| Error::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
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

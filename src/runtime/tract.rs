//! tract (pure Rust) as a runtime. Requires tract ≥ 0.23: earlier versions ignore the
//! `reduction` attribute of ScatterND/ScatterElements and give wrong MoE results.
use super::{Session, Value};
use crate::error::{Error, Result};
use crate::model::Model;
use tract_onnx::prelude::*;

/// A model compiled by tract.
pub struct TractSession {
    plan: std::sync::Arc<TypedSimplePlan>,
    /// The temporary model files of a large model (kept while the session lives).
    _files: Option<tempfile::TempDir>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

fn err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Graph {
        node: None,
        reason: format!("tract: {context}: {e}"),
    }
}

impl TractSession {
    /// Compiles a model from its protobuf bytes (external data must be inline).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(|e| err("loading", format!("{e:#}")))?;
        Self::compile(model)
    }

    /// Compiles an in-memory [`Model`] (through temporary files above 2 GiB).
    pub fn from_model(model: &Model) -> Result<Self> {
        match super::model_source(model)? {
            super::ModelSource::Bytes(bytes) => Self::from_bytes(&bytes),
            super::ModelSource::File { dir, path } => {
                let m = tract_onnx::onnx()
                    .model_for_path(&path)
                    .map_err(|e| err("loading", format!("{e:#}")))?;
                let mut s = Self::compile(m)?;
                s._files = Some(dir);
                Ok(s)
            }
        }
    }

    fn compile(model: InferenceModel) -> Result<Self> {
        let inputs = model
            .input_outlets()
            .map_err(|e| err("inputs", e))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let outputs = model
            .output_outlets()
            .map_err(|e| err("outputs", e))?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(String::from)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let plan = model
            .into_optimized()
            .map_err(|e| err("optimising", format!("{e:#}")))?
            .into_runnable()
            .map_err(|e| err("planning", format!("{e:#}")))?;
        Ok(TractSession {
            plan,
            _files: None,
            inputs,
            outputs,
        })
    }
}

impl Session for TractSession {
    fn runtime(&self) -> &'static str {
        "tract"
    }

    fn inputs(&self) -> Vec<String> {
        self.inputs.clone()
    }

    fn outputs(&self) -> Vec<String> {
        self.outputs.clone()
    }

    fn run(&mut self, inputs: &[(String, Value)]) -> Result<Vec<(String, Value)>> {
        let mut feed = TVec::new();
        for name in &self.inputs {
            let v = super::input(inputs, name)?;
            let t: Tensor = match v {
                Value::F32(a) => a.clone().into(),
                Value::I64(a) => a.clone().into(),
            };
            feed.push(t.into());
        }
        let out = self
            .plan
            .run(feed)
            .map_err(|e| err("running", format!("{e:#}")))?;
        let mut res = Vec::new();
        for (name, t) in self.outputs.iter().zip(out) {
            let t = t.into_tensor();
            let v = match t.datum_type() {
                DatumType::F32 => {
                    Value::F32(t.into_plain_array::<f32>().map_err(|e| err("output", e))?)
                }
                DatumType::I64 => {
                    Value::I64(t.into_plain_array::<i64>().map_err(|e| err("output", e))?)
                }
                other => {
                    let c = t
                        .cast_to::<f32>()
                        .map_err(|e| err(&format!("output of type {other:?}"), e))?;
                    Value::F32(
                        c.into_owned()
                            .into_plain_array::<f32>()
                            .map_err(|e| err("output", e))?,
                    )
                }
            };
            res.push((name.clone(), v));
        }
        Ok(res)
    }
}

//! tract (pure Rust) as a runtime. Requires tract ≥ 0.23: earlier versions ignore the
//! `reduction` attribute of ScatterND/ScatterElements and give wrong MoE results.
//!
//! The model is compiled once per concrete input signature (element types and shapes),
//! never with symbolic dimensions: exporters write symbolic shape algebra that tract's
//! symbol resolution cannot always follow (dynamo exports fail with "Clashing resolution
//! for expression", some TorchScript LMs with "square of symbols"), while every export that
//! onnxruntime runs has a concrete shape at run time. Plans are cached per signature.
use super::{Session, Value};
use crate::error::{Error, Result};
use crate::model::Model;
use std::sync::Arc;
use tract_onnx::prelude::*;

/// Compiled plans kept per session (calibration uses one or two signatures: the batch
/// shape and the last, shorter batch).
const PLAN_CACHE: usize = 4;

/// One input's element type and shape.
type Signature = Vec<(DatumType, Vec<usize>)>;

/// A model compiled by tract.
pub struct TractSession {
    model: InferenceModel,
    /// Compiled plans, oldest first (evicted first).
    plans: Vec<(Signature, Arc<TypedSimplePlan>)>,
    /// The temporary model files of a large model (kept while the session lives).
    _files: Option<tempfile::TempDir>,
    inputs: Vec<String>,
    /// Element types the model declares for its inputs (f32 values fed to a float16 input
    /// are converted).
    input_types: Vec<Option<DatumType>>,
    outputs: Vec<String>,
    /// Index inputs and the tables they index (checked before each run).
    bounds: super::IndexBounds,
}

fn err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime {
        runtime: "tract",
        stage: context.to_string(),
        reason: e.to_string(),
    }
}

/// tract's ONNX front end, with one parser fixed: ONNX defines `ConstantOfShape` without a
/// `value` attribute as float32 zeros, tract 0.23 makes them float64 (and the dynamo export
/// of DeepSeek-V3 then fails to type-check).
fn onnx() -> tract_onnx::Onnx {
    let mut o = tract_onnx::onnx();
    if let Some(default) = o.op_register.0.get("ConstantOfShape").copied() {
        DEFAULT_CONSTANT_OF_SHAPE.get_or_init(|| default);
        o.op_register
            .insert("ConstantOfShape", constant_of_shape_f32);
    }
    o
}

/// The signature of a tract ONNX op parser.
type OpBuilder = fn(
    &tract_onnx::model::ParsingContext,
    &tract_onnx::pb::NodeProto,
) -> TractResult<(
    Box<dyn tract_onnx::tract_hir::infer::InferenceOp>,
    Vec<String>,
)>;

static DEFAULT_CONSTANT_OF_SHAPE: std::sync::OnceLock<OpBuilder> = std::sync::OnceLock::new();

fn constant_of_shape_f32(
    ctx: &tract_onnx::model::ParsingContext,
    node: &tract_onnx::pb::NodeProto,
) -> TractResult<(
    Box<dyn tract_onnx::tract_hir::infer::InferenceOp>,
    Vec<String>,
)> {
    if node.attribute.iter().any(|a| a.name == "value") {
        let default = DEFAULT_CONSTANT_OF_SHAPE
            .get()
            .ok_or_else(|| anyhow::anyhow!("no ConstantOfShape parser"))?;
        return default(ctx, node);
    }
    Ok((
        tract_onnx::tract_hir::ops::expandable::expand(
            tract_onnx::tract_hir::ops::array::ConstantOfShape::new(rctensor0(0f32)),
        ),
        vec![],
    ))
}

/// The message of a caught panic.
fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl TractSession {
    /// Compiles a model from its protobuf bytes (external data must be inline).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let model = onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(|e| err("loading", format!("{e:#}")))?;
        Self::compile(model)
    }

    /// Compiles an in-memory [`Model`] (through temporary files above 2 GiB).
    pub fn from_model(model: &Model) -> Result<Self> {
        let mut s = Self::from_source(model)?;
        s.bounds = super::IndexBounds::of(&model.graph);
        Ok(s)
    }

    fn from_source(model: &Model) -> Result<Self> {
        match super::model_source(model, false)? {
            super::ModelSource::Bytes(bytes) | super::ModelSource::Referencing { bytes, .. } => {
                Self::from_bytes(&bytes)
            }
            super::ModelSource::File { dir, path } => {
                let m = onnx()
                    .model_for_path(&path)
                    .map_err(|e| err("loading", format!("{e:#}")))?;
                let mut s = Self::compile(m)?;
                s._files = Some(dir);
                Ok(s)
            }
        }
    }

    fn compile(mut model: InferenceModel) -> Result<Self> {
        let inputs: Vec<String> = model
            .input_outlets()
            .map_err(|e| err("inputs", e))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let input_types = (0..inputs.len())
            .map(|i| model.input_fact(i).ok().and_then(|f| f.datum_type()))
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
        // Value-info shapes are the exporter's claims, not facts: drop them so that tract
        // infers every intermediate shape from the concrete inputs (with them, the dynamo
        // export fails at its embedding Gather once the inputs are concrete; without the
        // concrete inputs it fails on its symbols: both are needed).
        for id in 0..model.nodes().len() {
            for slot in 0..model.node(id).outputs.len() {
                let outlet = OutletId::new(id, slot);
                if model.input_outlets().is_ok_and(|i| i.contains(&outlet)) {
                    continue;
                }
                let dt = model.outlet_fact(outlet).ok().and_then(|f| f.datum_type());
                let fact = match dt {
                    Some(dt) => InferenceFact::dt(dt),
                    None => InferenceFact::default(),
                };
                model
                    .set_outlet_fact(outlet, fact)
                    .map_err(|e| err("dropping declared shapes", e))?;
            }
        }
        Ok(TractSession {
            model,
            plans: Vec::new(),
            _files: None,
            inputs,
            input_types,
            outputs,
            bounds: super::IndexBounds::default(),
        })
    }

    /// The plan for one concrete input signature, compiled on first use.
    fn plan(&mut self, sig: &Signature) -> Result<Arc<TypedSimplePlan>> {
        if let Some((_, p)) = self.plans.iter().find(|(s, _)| s == sig) {
            return Ok(p.clone());
        }
        let mut model = self.model.clone();
        for (i, (dt, shape)) in sig.iter().enumerate() {
            model
                .set_input_fact(i, InferenceFact::dt_shape(*dt, shape.as_slice()))
                .map_err(|e| err(&format!("input '{}'", self.inputs[i]), e))?;
        }
        let plan = model
            .into_optimized()
            .map_err(|e| err("optimising", format!("{e:#}")))?
            .into_runnable()
            .map_err(|e| err("planning", format!("{e:#}")))?;
        if self.plans.len() >= PLAN_CACHE {
            self.plans.remove(0);
        }
        self.plans.push((sig.clone(), plan.clone()));
        Ok(plan)
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
        self.bounds.check(inputs)?;
        super::check_memory(inputs)?;
        let mut feed = TVec::new();
        let mut sig = Signature::new();
        for (name, declared) in self.inputs.iter().zip(&self.input_types) {
            let v = super::input(inputs, name)?;
            let mut t: Tensor = match v {
                Value::F32(a) => a.clone().into(),
                Value::I64(a) => a.clone().into(),
            };
            if let Some(dt) = declared.filter(|&d| d != t.datum_type() && d.is_float()) {
                t = t
                    .cast_to_dt(dt)
                    .map_err(|e| err(&format!("input '{name}'"), e))?
                    .into_owned();
            }
            sig.push((t.datum_type(), t.shape().to_vec()));
            feed.push(t.into());
        }
        let plan = self.plan(&sig)?;
        // tract asserts on some bad inputs instead of returning an error: a panic inside a
        // run becomes a runtime error, never a crash.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.run(feed)))
            .map_err(|p| err("running", format!("tract panicked: {}", panic_text(&p))))?
            .map_err(|e| err("running", format!("{e:#}")))?;
        let mut res = Vec::new();
        for (name, t) in self.outputs.iter().zip(out) {
            let t = t.into_tensor();
            // Shape values (tract computes them as symbolic dims) and narrower integers are
            // carried exactly as int64; every float as float32.
            let dt = t.datum_type();
            let v = if dt.is_integer() || dt == DatumType::TDim {
                Value::I64(plain::<i64>(t)?)
            } else {
                Value::F32(plain::<f32>(t)?)
            };
            res.push((name.clone(), v));
        }
        Ok(res)
    }
}

/// `t` as a plain array of `T`, converted when it holds another type.
fn plain<T: Datum>(t: Tensor) -> Result<tract_ndarray::ArrayD<T>> {
    let dt = t.datum_type();
    let t = if dt == T::datum_type() {
        t
    } else {
        t.cast_to::<T>()
            .map_err(|e| err(&format!("output of type {dt:?}"), e))?
            .into_owned()
    };
    t.into_plain_array::<T>().map_err(|e| err("output", e))
}

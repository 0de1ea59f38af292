//! onnxruntime through the `ort` crate, with the shared library loaded at run time
//! (`load-dynamic`): no download at build time. The library is found from
//! `ORT_DYLIB_PATH`, else from an installed Python `onnxruntime` package
//! (`onnxruntime/capi/libonnxruntime.so.*`).
use super::{Session, Value};
use crate::error::{Error, Result};
use crate::model::Model;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use super::select::Ep;

/// How to get onnxruntime (named in errors).
pub const HOW: &str = "install it with `pip install onnxruntime` (or onnxruntime-gpu for CUDA) \
                   or set ORT_DYLIB_PATH=/path/to/libonnxruntime.so";

/// Finds the onnxruntime shared library.
pub fn find_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(Error::Usage(format!(
            "ORT_DYLIB_PATH={} is not a file; {HOW}",
            p.display()
        )));
    }
    let mut pythons: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("SMOE_PYTHON") {
        pythons.push(p.into());
    }
    pythons.push(".venv/bin/python".into());
    pythons.push("python3".into());
    for py in pythons {
        let out = std::process::Command::new(&py)
            .args([
                "-c",
                "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
            ])
            .output();
        let Ok(out) = out else { continue };
        if !out.status.success() {
            continue;
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("capi");
        if let Some(lib) = newest_lib(&dir) {
            return Ok(lib);
        }
    }
    Err(Error::Usage(format!(
        "onnxruntime's shared library was not found; {HOW}"
    )))
}

fn newest_lib(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
        })
        .collect();
    libs.sort();
    libs.pop()
}

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment() -> Result<&'static ort::environment::Environment> {
    let env = ENV.get_or_init(|| {
        let lib = find_library().map_err(|e| e.to_string())?;
        log::info!("onnxruntime: {}", lib.display());
        ort::init_from(&lib)
            .map_err(|e| format!("loading {}: {e}", lib.display()))?
            .with_name("smoe-opt")
            .build()
            .map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|e| Error::Usage(e.clone()))
}

fn err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime {
        runtime: "onnxruntime",
        stage: context.to_string(),
        reason: e.to_string(),
    }
}

/// A model loaded by onnxruntime.
pub struct OrtSession {
    session: ort::session::Session,
    /// The temporary model files of a large model (kept while the session lives).
    _files: Option<tempfile::TempDir>,
    inputs: Vec<String>,
    /// Inputs the model declares as float16 (fed from f32 values, converted).
    f16_inputs: Vec<bool>,
    outputs: Vec<String>,
    /// Index inputs and the tables they index (checked before each run).
    bounds: super::IndexBounds,
    /// Whether onnxruntime read the input's external weights from their files itself.
    in_place: bool,
}

impl OrtSession {
    /// Loads an in-memory model on the given execution provider. The weights that are still
    /// those of the model's external data files are read by onnxruntime from those files
    /// (it maps them: no copy in this process); should that fail (an onnxruntime without
    /// the session option that names their folder), every weight is passed inline.
    pub fn from_model(model: &Model, ep: Ep) -> Result<Self> {
        let source = super::model_source(model, true)?;
        if !matches!(source, super::ModelSource::Referencing { .. }) {
            return Self::load(model, ep, source);
        }
        match Self::load(model, ep, source) {
            Ok(s) => Ok(s),
            Err(e) => {
                log::info!(
                    "onnxruntime did not read the external data in place ({e}); \
                     passing the weights in memory"
                );
                Self::load(model, ep, super::model_source(model, false)?)
            }
        }
    }

    /// Whether onnxruntime read the weights still in the input's external data files from
    /// those files itself (mapped) rather than from a copy passed in memory.
    pub fn weights_in_place(&self) -> bool {
        self.in_place
    }

    fn load(model: &Model, ep: Ep, source: super::ModelSource) -> Result<Self> {
        let in_place = matches!(source, super::ModelSource::Referencing { .. });
        let env = environment()?;
        let mut b = ort::session::Session::builder(env).map_err(|e| err("session options", e))?;
        if ep == Ep::Cuda {
            b = b
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| {
                    err(
                        "the CUDA execution provider is not available in this onnxruntime library",
                        e,
                    )
                })?;
        }
        if let super::ModelSource::Referencing { folder, .. } = &source {
            b = b
                .with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    folder.to_string_lossy(),
                )
                .map_err(|e| err("session options", e))?;
        }
        let session = match &source {
            super::ModelSource::Bytes(bytes) | super::ModelSource::Referencing { bytes, .. } => {
                b.commit_from_memory(bytes)
            }
            super::ModelSource::File { path, .. } => b.commit_from_file(path),
        }
        .map_err(|e| err("loading the model", e))?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let f16_inputs = session
            .inputs()
            .iter()
            .map(|o| o.dtype().tensor_type() == Some(ort::value::TensorElementType::Float16))
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Ok(OrtSession {
            session,
            _files: match source {
                super::ModelSource::File { dir, .. } => Some(dir),
                super::ModelSource::Bytes(_) | super::ModelSource::Referencing { .. } => None,
            },
            inputs,
            f16_inputs,
            outputs,
            bounds: super::IndexBounds::of(&model.graph),
            in_place,
        })
    }
}

impl Session for OrtSession {
    fn runtime(&self) -> &'static str {
        "onnxruntime"
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
        let mut feed: Vec<(String, ort::value::DynValue)> = Vec::new();
        for (name, &f16) in self.inputs.iter().zip(&self.f16_inputs) {
            let v = super::input(inputs, name)?;
            let t = match v {
                Value::F32(a) if f16 => ort::value::Tensor::from_array(a.mapv(half::f16::from_f32))
                    .map(|t| t.into_dyn()),
                Value::F32(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
                Value::I64(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
            }
            .map_err(|e| err(&format!("input '{name}'"), e))?;
            feed.push((name.clone(), t));
        }
        let out = self.session.run(feed).map_err(|e| err("running", e))?;
        let mut res = Vec::new();
        for name in &self.outputs {
            let v = &out[name.as_str()];
            let val = if let Ok(a) = v.try_extract_array::<f32>() {
                Value::F32(a.to_owned())
            } else if let Ok(a) = v.try_extract_array::<i64>() {
                Value::I64(a.to_owned())
            } else if let Ok(a) = v.try_extract_array::<half::f16>() {
                Value::F32(a.mapv(half::f16::to_f32))
            } else {
                return Err(err(&format!("output '{name}'"), "unsupported element type"));
            };
            res.push((name.clone(), val));
        }
        Ok(res)
    }
}

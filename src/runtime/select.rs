//! Which runtime runs a model: the one place that decides (calibration, fidelity and eval
//! all open their sessions here).
//!
//! `auto` tries tract (embedded) first and onnxruntime second — onnxruntime only when its
//! shared library is found; when neither can open the model the error says what each said
//! and how to get onnxruntime. Callers that can fall back further (calibration and fidelity
//! run smoe-opt's exact re-emission of the MoE blocks when the exported graph fails) do so
//! on top of this.
use super::Session;
use crate::error::{Error, Result};
use crate::model::Model;

/// Which runtime runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Runtime {
    /// tract when it can run the model, else onnxruntime.
    #[default]
    Auto,
    /// tract (embedded).
    Tract,
    /// onnxruntime (shared library found at run time).
    Ort,
}

/// onnxruntime's execution provider (`--ort-ep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Ep {
    /// CPU.
    #[default]
    Cpu,
    /// CUDA (fails clearly when the library has no CUDA provider).
    Cuda,
}

/// The runtimes to try for a `--runtime` choice, in order: `auto` is tract, then onnxruntime
/// where its library is found.
pub fn candidates(rt: Runtime) -> Vec<Runtime> {
    match rt {
        Runtime::Auto => {
            let mut v = vec![Runtime::Tract];
            if ort_available() {
                v.push(Runtime::Ort);
            }
            v
        }
        r => vec![r],
    }
}

/// Whether onnxruntime can be used (built in and its library found).
pub fn ort_available() -> bool {
    #[cfg(feature = "ort")]
    {
        super::ort::find_library().is_ok()
    }
    #[cfg(not(feature = "ort"))]
    {
        false
    }
}

/// The first operator of `model` that tract has no implementation of and onnxruntime has
/// (onnxruntime's fused MoE operators, as `domain.op`).
fn tract_lacks(model: &Model) -> Option<String> {
    model
        .graph
        .nodes()
        .find_map(|(_, n)| match (n.domain.as_deref(), n.op_type.as_deref()) {
            (Some(d @ "com.microsoft"), Some(op @ ("MoE" | "QMoE"))) => Some(format!("{d}.{op}")),
            _ => None,
        })
}

/// Opens `model` in exactly runtime `rt` (`auto` means tract here).
pub fn open_in(
    model: &Model,
    rt: Runtime,
    #[cfg(feature = "ort")] ep: super::ort::Ep,
) -> Result<Box<dyn Session>> {
    Ok(match rt {
        #[cfg(feature = "ort")]
        Runtime::Ort => Box::new(super::ort::OrtSession::from_model(model, ep)?),
        #[cfg(not(feature = "ort"))]
        Runtime::Ort => {
            return Err(Error::Usage(
                "this build has no onnxruntime support (feature 'ort')".into(),
            ))
        }
        Runtime::Tract | Runtime::Auto => open_tract(model)?,
    })
}

#[cfg(feature = "tract")]
fn open_tract(model: &Model) -> Result<Box<dyn Session>> {
    Ok(Box::new(super::tract::TractSession::from_model(model)?))
}

#[cfg(not(feature = "tract"))]
fn open_tract(_: &Model) -> Result<Box<dyn Session>> {
    Err(Error::Usage(
        "this build has no tract support (feature 'tract'); use --runtime ort".into(),
    ))
}

/// Opens `model` in the first runtime of [`candidates`] that can; the error names what each
/// said, and under `auto` without onnxruntime, how to install it.
pub fn open(
    model: &Model,
    rt: Runtime,
    #[cfg(feature = "ort")] ep: super::ort::Ep,
) -> Result<Box<dyn Session>> {
    let mut errors = Vec::new();
    let mut runtimes = candidates(rt);
    if runtimes.len() > 1 {
        if let Some(op) = tract_lacks(model) {
            // tract opens such a model and fails on its first run: straight to onnxruntime.
            log::info!("{op} runs in onnxruntime only");
            runtimes.retain(|&r| r != Runtime::Tract);
        }
    }
    for r in runtimes {
        match open_in(
            model,
            r,
            #[cfg(feature = "ort")]
            ep,
        ) {
            Ok(s) => return Ok(s),
            Err(e) => errors.push(e),
        }
    }
    if rt != Runtime::Auto && errors.len() == 1 {
        return Err(errors.remove(0));
    }
    let mut reason: Vec<String> = errors.iter().map(ToString::to_string).collect();
    if !ort_available() {
        reason.push(format!("onnxruntime was not found: {}", install_hint()));
    }
    Err(Error::Runtime {
        runtime: "auto",
        stage: "opening the model".into(),
        reason: reason.join("; "),
    })
}

/// The error of the last runtime tried for `rt`, with how to get onnxruntime when `auto`
/// could not try it (or `no runtime` when none was tried).
pub fn last_error(rt: Runtime, last: Option<Error>) -> Error {
    let e = last.unwrap_or_else(|| Error::Usage("no runtime could run the model".into()));
    if rt == Runtime::Auto && !ort_available() {
        Error::Runtime {
            runtime: "auto",
            stage: "running the model".into(),
            reason: format!("{e}; onnxruntime was not found: {}", install_hint()),
        }
    } else {
        e
    }
}

/// How to get onnxruntime.
pub fn install_hint() -> &'static str {
    #[cfg(feature = "ort")]
    {
        super::ort::HOW
    }
    #[cfg(not(feature = "ort"))]
    {
        "this build has no onnxruntime support; rebuild with the 'ort' feature"
    }
}

//! `smoe_opt._native`: the Python package's native module. It runs smoe-opt's command line
//! in-process — the same flags, checks, writes and messages as the `smoe-opt` binary — with
//! the GIL released, and turns failures into typed Python exceptions carrying the CLI's
//! message. Rust log records go to Python's `logging` (loggers `smoe_opt.*`).
use pyo3::create_exception;
use pyo3::prelude::*;
use std::path::PathBuf;

create_exception!(
    _native,
    SmoeOptError,
    pyo3::exceptions::PyException,
    "A smoe-opt run failed (the base of every smoe-opt exception)."
);
create_exception!(
    _native,
    UsageError,
    SmoeOptError,
    "Invalid arguments or paths (the CLI's exit code 2)."
);
create_exception!(
    _native,
    DataError,
    UsageError,
    "Calibration or evaluation data does not fit the model (a UsageError: exit code 2)."
);
create_exception!(
    _native,
    StatsError,
    UsageError,
    "Routing statistics do not fit the model or lack what the method needs (a UsageError)."
);
create_exception!(
    _native,
    InputError,
    SmoeOptError,
    "A model or input file is unreadable, malformed or inconsistent."
);
create_exception!(
    _native,
    RuntimeFailure,
    SmoeOptError,
    "tract or onnxruntime failed to load, compile or run a model."
);
create_exception!(
    _native,
    QualityError,
    SmoeOptError,
    "The written model moved further from the original than --max-error allows."
);
create_exception!(
    _native,
    WriteError,
    SmoeOptError,
    "The output could not be written, or a rewrite could not be applied."
);

fn to_py(e: anyhow::Error) -> PyErr {
    use smoe_opt::Error as E;
    let msg = smoe_opt::cli::message(&e);
    match smoe_opt::cli::library_error(&e) {
        Some(E::Usage(_)) => UsageError::new_err(msg),
        Some(E::Data(_)) => DataError::new_err(msg),
        Some(E::Stats(_)) => StatsError::new_err(msg),
        Some(
            E::Io { .. }
            | E::Decode { .. }
            | E::Input { .. }
            | E::ExternalData { .. }
            | E::Tensor { .. }
            | E::Graph { .. },
        ) => InputError::new_err(msg),
        Some(E::Runtime { .. }) => RuntimeFailure::new_err(msg),
        Some(E::Quality(_)) => QualityError::new_err(msg),
        Some(E::Write { .. } | E::Patch { .. }) => WriteError::new_err(msg),
        None => SmoeOptError::new_err(msg),
    }
}

/// Runs `smoe-opt ARGV…` (without the program name) as the command line would.
#[pyfunction]
fn run(py: Python<'_>, argv: Vec<String>) -> PyResult<()> {
    reread_log_levels();
    let args = std::iter::once("smoe-opt".to_string()).chain(argv);
    // clap's text starts "error: " and ends with a pointer to --help; the exception carries
    // the message itself, as the other errors do.
    let cli = smoe_opt::cli::parse(args).map_err(|e| {
        let text = e.to_string();
        let msg = text.trim_start_matches("error: ");
        let msg = msg.split("\n\nFor more information").next().unwrap_or(msg);
        UsageError::new_err(msg.trim_end().to_string())
    })?;
    py.detach(|| smoe_opt::cli::run(cli)).map_err(to_py)
}

/// pyo3-log caches each logger's level; a call reads them afresh, so `logging` settings made
/// since the previous call (e.g. `smoe_opt.progress` set to INFO) apply.
static LOG_LEVELS: std::sync::OnceLock<pyo3_log::ResetHandle> = std::sync::OnceLock::new();

fn reread_log_levels() {
    if let Some(handle) = LOG_LEVELS.get() {
        handle.reset();
    }
}

/// `smoe-opt inspect PATH --json`, as a JSON string.
#[pyfunction]
fn inspect_json(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    reread_log_levels();
    py.detach(|| -> anyhow::Result<String> {
        let model = smoe_opt::Model::load(&path)?;
        Ok(serde_json::to_string(&smoe_opt::inspect::inspect(&model))?)
    })
    .map_err(to_py)
}

/// The version of the smoe-opt library inside.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let _ = LOG_LEVELS.set(pyo3_log::init());
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_json, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    let py = m.py();
    m.add("SmoeOptError", py.get_type::<SmoeOptError>())?;
    m.add("UsageError", py.get_type::<UsageError>())?;
    m.add("DataError", py.get_type::<DataError>())?;
    m.add("StatsError", py.get_type::<StatsError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("RuntimeFailure", py.get_type::<RuntimeFailure>())?;
    m.add("QualityError", py.get_type::<QualityError>())?;
    m.add("WriteError", py.get_type::<WriteError>())?;
    Ok(())
}

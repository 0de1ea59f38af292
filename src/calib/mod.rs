//! Calibration: run data through a runtime and collect each MoE layer's routing statistics.
//!
//! The model is instrumented (each block's input hidden states and router logits become
//! extra outputs), run batch by batch, and every batch is folded into streaming
//! statistics ([`stats::LayerAcc`]). Expert outputs are computed here from the described
//! weights, so the runtime only has to produce hidden states and logits.
pub mod ffn;
pub mod kv_cache;
mod paired;
mod segmented;
mod session;
pub mod stats;
pub use paired::{calibrate_paired, Paired};
pub use segmented::{calibrate_segmented, calibrate_segmented_with, OnLayer};
pub(crate) use session::Resilient;

use crate::error::{Error, Result};
use crate::inspect::describe;
use crate::ir::Patch;
use crate::model::Model;
use crate::moe::Detection;
use crate::runtime::{read_npz, Value};
use ndarray::{ArrayD, Axis, IxDyn};
use serde::Serialize;
use stats::{LayerAcc, LayerStats, StatsConfig};
use std::path::{Path, PathBuf};

/// Where calibration data comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An `.npz` whose keys are model input names; first axis = samples.
    Npz(PathBuf),
    /// A text file cut into windows of `seq_len` tokens by a `tokenizer.json`.
    Text {
        /// The text.
        text: PathBuf,
        /// The tokenizer (Hugging Face `tokenizer.json`).
        tokenizer: PathBuf,
        /// Tokens per window.
        seq_len: usize,
    },
    /// No data: statistics from the weights alone (uniform frequencies; weak: says so).
    DataFree,
    /// `samples` random sequences of `seq_len` token ids (weak: says so).
    Random {
        /// Number of sequences.
        samples: usize,
        /// Tokens per sequence.
        seq_len: usize,
    },
}

/// Which runtime runs the calibration data (see [`crate::runtime::open`]).
pub use crate::runtime::Runtime;

/// Calibration options.
#[derive(Debug, Clone)]
pub struct CalibOptions {
    /// The runtime.
    pub runtime: Runtime,
    /// onnxruntime execution provider.
    #[cfg(feature = "ort")]
    pub ep: crate::runtime::ort::Ep,
    /// The data.
    pub source: Source,
    /// Samples per runtime call.
    pub batch: usize,
    /// Statistics knobs.
    pub stats: StatsConfig,
    /// Show a progress bar.
    pub progress: bool,
}

impl CalibOptions {
    /// Calibration on `source` with the command line's defaults: `--runtime auto`, the CPU,
    /// 8 samples per call, default statistics (1024 reservoir rows per expert, seed 0),
    /// no progress bar.
    pub fn new(source: Source) -> Self {
        CalibOptions {
            runtime: Runtime::Auto,
            #[cfg(feature = "ort")]
            ep: crate::runtime::ort::Ep::Cpu,
            source,
            batch: 8,
            stats: Default::default(),
            progress: false,
        }
    }

    /// Options for running models outside calibration (fidelity, plan comparisons,
    /// estimates): `runtime` (and `ep`), `batch` samples per call, no data source.
    pub fn for_runs(
        runtime: Runtime,
        #[cfg(feature = "ort")] ep: crate::runtime::ort::Ep,
        batch: usize,
    ) -> Self {
        CalibOptions {
            runtime,
            #[cfg(feature = "ort")]
            ep,
            source: Source::DataFree,
            batch,
            stats: Default::default(),
            progress: false,
        }
    }
}

/// Statistics of a whole model.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct CalibStats {
    /// The runtime used.
    pub runtime: String,
    /// Description of the data.
    pub source: String,
    /// Samples run.
    pub samples: usize,
    /// Seconds spent loading/compiling the model in the runtime.
    pub seconds_setup: f64,
    /// Seconds spent running batches and folding statistics.
    pub seconds_run: f64,
    /// Per MoE block.
    pub layers: Vec<LayerStats>,
}

impl CalibStats {
    /// Statistics holding one block's (what a one-layer planning step takes).
    pub fn of_layer(layer: LayerStats) -> Self {
        CalibStats {
            runtime: String::new(),
            source: String::new(),
            samples: 0,
            seconds_setup: 0.0,
            seconds_run: 0.0,
            layers: vec![layer],
        }
    }
}

/// Calibrates `model`'s detected blocks (those with every expert identified).
pub fn calibrate(model: &Model, det: &Detection, opts: &CalibOptions) -> Result<CalibStats> {
    let data = match opts.source {
        Source::DataFree => vec![],
        _ => load_inputs(model, &opts.source)?,
    };
    calibrate_on(model, det, opts, &data)
}

/// [`calibrate`] on inputs already loaded with [`load_inputs`] (first axis = samples), e.g.
/// the part of the data kept apart from a held-out evaluation split.
pub fn calibrate_on(
    model: &Model,
    det: &Detection,
    opts: &CalibOptions,
    data: &[(String, Value)],
) -> Result<CalibStats> {
    let blocks = det.identified_blocks();
    if blocks.is_empty() {
        return Err(Error::Usage(
            "no calibratable MoE block was detected".into(),
        ));
    }
    if let Source::DataFree = opts.source {
        log::warn!(
            "--data-free: no data; frequencies are uniform and similarities come from router weights only"
        );
        let layers = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(LayerAcc::new(&model.graph, b, opts.stats.clone(), i)?
                    .finish_data_free(&model.graph))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(CalibStats {
            runtime: "none".into(),
            source: "data-free (weights only)".into(),
            samples: 0,
            seconds_setup: 0.0,
            seconds_run: 0.0,
            layers,
        });
    }
    let t_setup = std::time::Instant::now();
    let mut session = session::Resilient::open_for_stats(model, det, blocks.clone(), opts)?;
    let seconds_setup = t_setup.elapsed().as_secs_f64();
    let t_run = std::time::Instant::now();
    let samples = data.first().map(|(_, v)| v.shape()[0]).unwrap_or(0);
    let mut accs = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| LayerAcc::new(&model.graph, b, opts.stats.clone(), i))
        .collect::<Result<Vec<_>>>()?;
    let bar = crate::progress::count_bar(opts.progress, samples as u64, "samples");
    bar.set_message("calibrating");
    let mut tokens_seen = 0usize;
    let batch = opts.batch.max(1);
    for start in (0..samples).step_by(batch) {
        let end = (start + batch).min(samples);
        let feed: Vec<(String, Value)> = data
            .iter()
            .map(|(n, v)| (n.clone(), slice(v, start, end)))
            .collect();
        let out = session.run(&feed, &format!("batch {start}..{end}"))?;
        let logits = session.logits();
        for (li, (acc, b)) in accs.iter_mut().zip(&blocks).enumerate() {
            let kept = fold(acc, b, &out, &feed, &logits[li])?;
            if li == 0 {
                tokens_seen += kept;
            }
        }
        bar.set_position(end as u64);
        bar.set_message(format!(
            "calibrating ({:.0} tokens/s)",
            tokens_seen as f64 / t_run.elapsed().as_secs_f64().max(1e-9)
        ));
    }
    bar.finish_and_clear();
    Ok(CalibStats {
        runtime: session.runtime().into(),
        source: describe_source(&opts.source),
        samples,
        seconds_setup,
        seconds_run: t_run.elapsed().as_secs_f64(),
        layers: accs.into_iter().map(LayerAcc::finish).collect(),
    })
}

/// The data, in words (the statistics' `source`).
fn describe_source(source: &Source) -> String {
    match source {
        Source::Npz(p) => format!("npz {}", p.display()),
        Source::Random { samples, seq_len } => format!("random token ids: {samples} x {seq_len}"),
        Source::Text { text, seq_len, .. } => {
            format!("text {} in windows of {seq_len} tokens", text.display())
        }
        Source::DataFree => "data-free (weights only)".to_string(),
    }
}

/// Folds one batch into `acc`: block `b`'s inputs (from the run's outputs `out`, else the
/// `feed`) and its router logits `logits`; padding (`attention_mask` = 0) is skipped.
/// Returns the tokens counted.
fn fold(
    acc: &mut LayerAcc,
    b: &crate::moe::MoeBlock,
    out: &[(String, Value)],
    feed: &[(String, Value)],
    logits: &str,
) -> Result<usize> {
    let get = |name: &str| -> Result<ArrayD<f32>> {
        out.iter()
            .chain(feed.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_f32())
            .ok_or_else(|| Error::Tensor {
                tensor: name.to_string(),
                reason: "the runtime returned no such output".into(),
            })
    };
    let x = get(&b.input)?;
    let z = get(logits)?;
    let h = b.hidden();
    let seq_len = if x.ndim() == 3 {
        x.shape()[1]
    } else {
        x.shape()[0]
    };
    let rows = x.len() / h;
    let x2 = x
        .into_shape_with_order((rows, h))
        .map_err(|e| Error::Tensor {
            tensor: b.input.clone(),
            reason: format!("block input is not [tokens, {h}]: {e}"),
        })?;
    let n = b.router.num_experts;
    let z2 = z
        .into_shape_with_order((rows, n))
        .map_err(|e| Error::Tensor {
            tensor: logits.to_string(),
            reason: format!("router logits are not [{rows} tokens, {n} experts]: {e}"),
        })?;
    let keep: Vec<bool> = match feed.iter().find(|(n, _)| n == "attention_mask") {
        Some((_, m)) if m.shape().iter().product::<usize>() == rows => {
            m.to_f32().iter().map(|&v| v != 0.0).collect()
        }
        _ => vec![true; rows],
    };
    acc.update(x2.view(), z2.view(), &keep, seq_len);
    Ok(keep.iter().filter(|&&k| k).count())
}

/// `model` with the watched blocks' inputs and router logits (`logits`) as extra graph
/// outputs. With `only`, they are its only outputs and what computes nothing else they need
/// is removed (the layers after the last watched block, the head): what statistics need
/// and no more.
fn instrument(
    model: &Model,
    blocks: &[&crate::moe::MoeBlock],
    logits: &[String],
    only: bool,
) -> Result<Model> {
    let mut inst = model.clone();
    let mut p = Patch::new("calibration outputs");
    let mut wanted = Vec::new();
    for (b, l) in blocks.iter().zip(logits) {
        // A block input that is a graph input is read from the feed instead.
        if !model.graph.is_input(&b.input) {
            p.add_output(b.input.clone());
            wanted.push(b.input.clone());
        }
        p.add_output(l.clone());
        wanted.push(l.clone());
    }
    if only && !wanted.is_empty() {
        p.retain_outputs(wanted);
    }
    inst.graph.apply(p)?;
    if only {
        let dead = crate::ir::prune(&inst.graph, "calibration outputs only");
        if !dead.is_empty() {
            inst.graph.apply(dead)?;
        }
    }
    Ok(inst)
}

/// The error when tract cannot run a model even with its MoE blocks re-emitted: the rest
/// of the graph (e.g. onnxruntime contrib ops such as GroupQueryAttention) needs
/// onnxruntime, and the message says how to get it.
fn tract_cannot(runtime: Runtime, original: &Error, reemitted: &Error) -> Error {
    let what = format!(
        "the model cannot be run ({original}); with its MoE blocks re-emitted, neither \
         ({reemitted})"
    );
    let hint = crate::runtime::install_hint();
    match runtime {
        Runtime::Auto if what.contains(hint) => Error::Usage(what),
        Runtime::Auto => Error::Usage(format!(
            "{what}. onnxruntime is needed and was not found: {hint}"
        )),
        _ => Error::Usage(format!("{what}. Use --runtime ort (onnxruntime)")),
    }
}

/// Samples `start..end` (first axis) of a value.
pub fn slice(v: &Value, start: usize, end: usize) -> Value {
    match v {
        Value::F32(a) => Value::F32(a.slice_axis(Axis(0), (start..end).into()).to_owned()),
        Value::I64(a) => Value::I64(a.slice_axis(Axis(0), (start..end).into()).to_owned()),
    }
}

/// The model's inputs (non-initializer graph inputs) as `name dtype [dims]`.
fn expected(model: &Model) -> Vec<String> {
    model
        .graph
        .data_inputs()
        .map(|v| {
            let d = describe(v);
            let dims: Vec<String> = d
                .shape
                .unwrap_or_default()
                .iter()
                .map(|x| x.to_string().trim_matches('"').to_string())
                .collect();
            format!("{} {} [{}]", d.name, d.dtype, dims.join(", "))
        })
        .collect()
}

/// The model's inputs for `source`, one array per model input (first axis = samples).
pub fn load_inputs(model: &Model, source: &Source) -> Result<Vec<(String, Value)>> {
    let all: Vec<_> = model.graph.data_inputs().map(describe).collect();
    let given = match source {
        Source::Npz(path) => crate::runtime::npz_names(path)?,
        _ => Vec::new(),
    };
    // Past key/value caches the data does not give are empty (a prefill of each window).
    let (past, inputs): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|i| kv_cache::is_past(i) && !given.contains(&i.name));
    let mut out = load_given(model, source, inputs)?;
    // (Data-free calibration has no inputs at all.)
    if let (false, Some((_, first))) = (past.is_empty(), out.first()) {
        let batch = first.shape()[0];
        for i in &past {
            out.push((i.name.clone(), kv_cache::empty_past(model, i, batch)?));
        }
        log::info!(
            "{} past key/value inputs fed as empty caches (each window is a prefill)",
            past.len()
        );
    }
    Ok(out)
}

/// [`load_inputs`] for the inputs `inputs` (past caches excluded).
fn load_given(
    model: &Model,
    source: &Source,
    inputs: Vec<crate::inspect::ValueDesc>,
) -> Result<Vec<(String, Value)>> {
    match source {
        Source::Npz(path) => {
            let all = read_npz(path)?;
            let mut out = Vec::new();
            for i in &inputs {
                let Some((_, v)) = all.iter().find(|(n, _)| *n == i.name) else {
                    return Err(Error::Data(format!(
                        "{}: no array '{}'; the model expects: {}",
                        path.display(),
                        i.name,
                        expected(model).join("; ")
                    )));
                };
                let ok_type = matches!(
                    (v, i.dtype.as_str()),
                    (Value::F32(_), "float" | "float16" | "bfloat16") | (Value::I64(_), "int64")
                );
                let rank = i.shape.as_ref().map_or(v.shape().len(), Vec::len);
                if !ok_type || rank != v.shape().len() {
                    return Err(Error::Data(format!(
                        "{}: array '{}' has shape {:?} ({}); the model expects: {}",
                        path.display(),
                        i.name,
                        v.shape(),
                        if matches!(v, Value::F32(_)) {
                            "float"
                        } else {
                            "int64"
                        },
                        expected(model).join("; ")
                    )));
                }
                out.push((i.name.clone(), v.clone()));
            }
            let n0 = out.first().map(|(_, v)| v.shape()[0]);
            if out.iter().any(|(_, v)| Some(v.shape()[0]) != n0) {
                return Err(Error::Data(format!(
                    "{}: arrays disagree on the number of samples",
                    path.display()
                )));
            }
            for (n, _) in &all {
                if !inputs.iter().any(|i| i.name == *n) {
                    log::info!(
                        "{}: ignoring array '{n}' (not a model input)",
                        path.display()
                    );
                }
            }
            Ok(out)
        }
        Source::DataFree => Ok(vec![]),
        Source::Text {
            text,
            tokenizer,
            seq_len,
        } => {
            let json = crate::inputs::read_text(tokenizer, 1 << 30, "a tokenizer")?;
            let tok = json
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| Error::Input {
                    path: tokenizer.clone(),
                    reason: format!("not a tokenizer.json: {e}"),
                })?;
            let body = crate::inputs::read_text(text, 4 << 30, "calibration text")?;
            let enc = tok.encode(body.as_str(), false).map_err(|e| Error::Input {
                path: text.to_path_buf(),
                reason: format!("tokenizing failed: {e}"),
            })?;
            let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
            let l = (*seq_len).max(1);
            if ids.is_empty() {
                return Err(Error::Data(format!("{}: no tokens", text.display())));
            }
            // onnxruntime's GroupQueryAttention refuses a right-padded prompt (it reads the
            // sequence lengths from the mask), so its models get whole windows only.
            let gqa = model
                .graph
                .nodes()
                .any(|(_, n)| n.op_type.as_deref() == Some("GroupQueryAttention"));
            let mut ids = ids;
            if gqa && ids.len() > l && ids.len() % l != 0 {
                let dropped = ids.len() % l;
                ids.truncate(ids.len() - dropped);
                log::info!(
                    "{}: the last {dropped} tokens are not used: GroupQueryAttention models \
                     are calibrated on whole windows of {l} (no padding)",
                    text.display()
                );
            }
            let n = ids.len().div_ceil(l);
            let pad = tok
                .token_to_id("[PAD]")
                .or_else(|| tok.token_to_id("<pad>"))
                .unwrap_or(0) as i64;
            let mut input_ids = ArrayD::from_elem(IxDyn(&[n, l]), pad);
            let mut mask = ArrayD::from_elem(IxDyn(&[n, l]), 0i64);
            for (k, &id) in ids.iter().enumerate() {
                input_ids[[k / l, k % l]] = id;
                mask[[k / l, k % l]] = 1;
            }
            log::info!(
                "{}: {} tokens in {n} windows of {l}",
                text.display(),
                ids.len()
            );
            let mut out = Vec::new();
            for i in &inputs {
                let v = match i.name.as_str() {
                    "attention_mask" => Value::I64(mask.clone()),
                    "position_ids" => {
                        Value::I64(ArrayD::from_shape_fn(IxDyn(&[n, l]), |d| d[1] as i64))
                    }
                    _ if i.dtype == "int64" => {
                        if let Some(v) = vocab_size(model, &i.name) {
                            if let Some(bad) = ids.iter().find(|&&t| t as u64 >= v) {
                                return Err(Error::Data(format!(
                                    "token id {bad} from {} is outside the model's vocabulary of {v}",
                                    tokenizer.display()
                                )));
                            }
                        }
                        Value::I64(input_ids.clone())
                    }
                    _ => {
                        return Err(Error::Data(format!(
                            "text calibration needs token-id inputs; the model expects: {}",
                            expected(model).join("; ")
                        )))
                    }
                };
                out.push((i.name.clone(), v));
            }
            Ok(out)
        }
        Source::Random { samples, seq_len } => {
            log::warn!(
                "calibrating on random token ids: routing statistics of real text will differ"
            );
            let mut rng = 0x853C49E6748FEA9Bu64;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (b, s) = (*samples, *seq_len);
            let need = (b as u128) * (s as u128) * 8 * inputs.len() as u128;
            if let Some(avail) = crate::inputs::available_memory() {
                if need > avail as u128 / 2 {
                    return Err(Error::Data(format!(
                        "--calib-random {b} with --seq-len {s} makes {:.1} GiB of inputs, more than \
                         half the {:.1} GiB of memory available; ask for fewer samples",
                        need as f64 / (1u64 << 30) as f64,
                        avail as f64 / (1u64 << 30) as f64
                    )));
                }
            }
            let mut out = Vec::new();
            for i in &inputs {
                let v =
                    match (i.name.as_str(), i.dtype.as_str()) {
                        ("attention_mask", _) => Value::I64(ArrayD::from_elem(IxDyn(&[b, s]), 1)),
                        ("position_ids", _) => {
                            Value::I64(ArrayD::from_shape_fn(IxDyn(&[b, s]), |d| d[1] as i64))
                        }
                        (_, "int64") => {
                            let vocab = vocab_size(model, &i.name).ok_or_else(|| {
                                Error::Data(format!(
                                "cannot tell the vocabulary size of input '{}' for --calib-random",
                                i.name
                            ))
                            })?;
                            Value::I64(ArrayD::from_shape_fn(IxDyn(&[b, s]), |_| {
                                (next() % vocab) as i64
                            }))
                        }
                        (_, "float") => {
                            let dims: Vec<usize> =
                                i.shape
                                    .as_ref()
                                    .map(|d| {
                                        d.iter()
                                            .enumerate()
                                            .map(|(k, x)| {
                                                x.as_u64()
                                                    .map(|v| v as usize)
                                                    .unwrap_or(if k == 0 { b } else { s })
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_else(|| vec![b, s]);
                            Value::F32(ArrayD::from_shape_fn(IxDyn(&dims), |_| {
                                // Box–Muller from two uniforms.
                                let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                                let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
                                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos())
                                    as f32
                            }))
                        }
                        (n, t) => {
                            return Err(Error::Data(format!(
                                "cannot make random data for input '{n}' of type {t}"
                            )))
                        }
                    };
                out.push((i.name.clone(), v));
            }
            Ok(out)
        }
    }
}

/// The vocabulary size of a token-id input: rows of the embedding table it gathers from
/// (following reshapes and casts).
fn vocab_size(model: &Model, input: &str) -> Option<u64> {
    let g = &model.graph;
    let mut frontier = vec![input.to_string()];
    let mut steps = 0;
    while let Some(v) = frontier.pop() {
        steps += 1;
        if steps > 64 {
            return None;
        }
        for &c in g.consumers(&v) {
            let n = g.node(c)?;
            match n.op_type.as_deref() {
                Some("Gather") if n.input.get(1) == Some(&v) => {
                    if let Some(rows) = table_rows(g, &n.input[0], 0) {
                        return Some(rows);
                    }
                }
                // onnxruntime-genai's int4/int8 embedding: rows of the block scales.
                Some("GatherBlockQuantized") if n.input.get(1) == Some(&v) => {
                    let axis = crate::moe::view::View::new(g)
                        .attr_int(c, "gather_axis")
                        .unwrap_or(0);
                    let d = crate::moe::consts::const_dims(g, n.input.get(2)?)?;
                    if let Some(&r) = usize::try_from(axis).ok().and_then(|a| d.get(a)) {
                        return Some(r as u64);
                    }
                }
                Some("Reshape" | "Cast" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity")
                    if n.input[0] == v =>
                {
                    frontier.push(n.output[0].clone())
                }
                _ => {}
            }
        }
    }
    None
}

/// Rows of a 2-D table computed from constants: a constant, or a Transpose (tied embeddings:
/// the transposed LM head), Reshape to a constant shape, Cast or Identity of one.
fn table_rows(g: &crate::ir::Graph, value: &str, depth: usize) -> Option<u64> {
    use crate::moe::consts::{const_dims, const_ints};
    if let Some(d) = const_dims(g, value).filter(|_| crate::moe::consts::is_const(g, value)) {
        return (d.len() == 2).then_some(d[0] as u64);
    }
    if depth > 8 {
        return None;
    }
    let n = g.node(g.producer(value)?)?;
    match n.op_type.as_deref()? {
        "Cast" | "Identity" => table_rows(g, &n.input[0], depth + 1),
        "Transpose" => {
            let d = const_dims(g, &n.input[0])?;
            let perm = crate::moe::view::View::new(g)
                .attr_ints(g.producer(value)?, "perm")
                .unwrap_or_else(|| (0..d.len() as i64).rev().collect());
            (d.len() == 2).then(|| d[perm[0] as usize] as u64)
        }
        "Reshape" => {
            let s = const_ints(g, n.input.get(1)?)?;
            (s.len() == 2 && s[0] > 0).then_some(s[0] as u64)
        }
        _ => None,
    }
}

/// The statistics file as [`save`] writes it: the statistics and the name of their sidecar.
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct StatsFile {
    #[serde(flatten)]
    stats: CalibStats,
    /// The `.npz` sidecar's file name, in the JSON file's folder: per block
    /// `<block>.mean_output` (N×H), `<block>.input_moments` (N×H×H, f64) and
    /// `<block>.samples.<e>` (routed input rows × H, f32).
    sidecar: String,
}

/// The JSON Schema of a statistics file (`smoe-opt calibrate -o FILE.json`), generated from
/// the Rust types (committed as `schemas/stats.schema.json`).
pub fn stats_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(StatsFile)).expect("a schema serialises")
}

/// Writes statistics as JSON plus an `.npz` sidecar (`<json stem>.npz`) with the big arrays.
pub fn save(stats: &CalibStats, json: &Path) -> Result<PathBuf> {
    let side = json.with_extension("npz");
    let mut tmp = crate::fsutil::AtomicFile::create(&side)?;
    {
        let f = tmp.file().try_clone().map_err(|e| Error::io(&side, e))?;
        let mut w = ndarray_npy::NpzWriter::new(f);
        let io = |e: ndarray_npy::WriteNpzError| Error::Write {
            path: side.clone(),
            reason: e.to_string(),
        };
        for l in &stats.layers {
            w.add_array(format!("{}.mean_output", l.block), &l.mean_output)
                .map_err(io)?;
            let h = l.mean_output.ncols();
            let mut m = ndarray::Array3::<f64>::zeros((l.input_moments.len(), h, h));
            for (i, mm) in l.input_moments.iter().enumerate() {
                m.index_axis_mut(Axis(0), i).assign(mm);
            }
            w.add_array(format!("{}.input_moments", l.block), &m)
                .map_err(io)?;
            for (e, rows) in l.samples.iter().enumerate() {
                let a = ndarray::Array2::from_shape_vec((rows.len(), h), rows.concat())
                    .expect("rows of H");
                w.add_array(format!("{}.samples.{e}", l.block), &a)
                    .map_err(io)?;
            }
        }
        w.finish().map_err(io)?;
    }
    tmp.commit()?;
    let mut j = serde_json::to_value(stats).map_err(|e| Error::Write {
        path: json.to_path_buf(),
        reason: format!("serialising the statistics: {e}"),
    })?;
    j["sidecar"] = serde_json::Value::from(
        side.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let text = serde_json::to_string_pretty(&j).map_err(|e| Error::Usage(e.to_string()))?;
    let mut f = crate::fsutil::AtomicFile::create(json)?;
    std::io::Write::write_all(f.file(), text.as_bytes()).map_err(|e| Error::io(json, e))?;
    f.commit()?;
    Ok(side)
}

/// Reads statistics written by [`save`]: the JSON and its `.npz` sidecar.
pub fn load(json: &Path) -> Result<CalibStats> {
    let text = crate::inputs::read_text(json, 1 << 30, "a statistics file")?;
    let bad = |reason: String| Error::Input {
        path: json.to_path_buf(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut stats: CalibStats = serde_json::from_value(v.clone())
        .map_err(|e| bad(format!("not smoe-opt statistics: {e}")))?;
    let side_name = v["sidecar"]
        .as_str()
        .ok_or_else(|| bad("no 'sidecar' entry".into()))?;
    let side = crate::fsutil::parent_dir(json).join(side_name);
    crate::runtime::npz_check::check(&side)?;
    let f = crate::inputs::open_regular(&side)?;
    let mut npz = ndarray_npy::NpzReader::new(f).map_err(|e| Error::Input {
        path: side.clone(),
        reason: e.to_string(),
    })?;
    let sbad = |what: String, e: ndarray_npy::ReadNpzError| Error::Input {
        path: side.clone(),
        reason: format!("{what}: {e}"),
    };
    for l in &mut stats.layers {
        let key = format!("{}.mean_output", l.block);
        l.mean_output = npz.by_name(&key).map_err(|e| sbad(key.clone(), e))?;
        let key = format!("{}.input_moments", l.block);
        let m: ndarray::Array3<f64> = npz.by_name(&key).map_err(|e| sbad(key.clone(), e))?;
        l.input_moments = m.outer_iter().map(|a| a.to_owned()).collect();
        l.samples = (0..l.num_experts)
            .map(|e| {
                let key = format!("{}.samples.{e}", l.block);
                let a: ndarray::Array2<f32> =
                    npz.by_name(&key).map_err(|err| sbad(key.clone(), err))?;
                Ok(a.outer_iter().map(|r| r.to_vec()).collect())
            })
            .collect::<Result<_>>()?;
    }
    Ok(stats)
}

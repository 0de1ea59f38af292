//! Empty key/value caches for decoder exports that take them as inputs
//! (onnxruntime-genai builder models, optimum's `past_key_values.*`).
//!
//! Calibration and evaluation run whole windows (a prefill), so every past cache is empty:
//! its batch dimension is the batch, its past-length dimension is 0 (a sliding-window
//! cache is a buffer of the window's size, all of it invalid), and its head size is the
//! model's. Builders leave the head size symbolic (`kv_cache_dim`, so that one export
//! serves plain and quantised caches); it is read from the attention node that consumes the
//! cache: `GroupQueryAttention`/`MultiHeadAttention` with a packed or separate query
//! projection whose weight gives `heads × head_size` columns.
use crate::error::{Error, Result};
use crate::inspect::ValueDesc;
use crate::ir::node_attr;
use crate::model::Model;
use crate::moe::consts::{const_dims, is_const};
use crate::runtime::Value;
use ndarray::{ArrayD, IxDyn};

/// Whether a model input is a past key/value cache.
pub fn is_past(input: &ValueDesc) -> bool {
    let n = input.name.to_ascii_lowercase();
    // rank 4: key/value caches; rank 3: LFM2's convolution state `past.N.conv`
    // [batch, channels, kernel - 1] (zeros before the first token).
    let rank = input.shape.as_ref().map_or(0, Vec::len);
    (n.starts_with("past") || n.contains(".past") || n.contains("_past")) && (3..=4).contains(&rank)
}

/// Whether a model output is a present key/value cache (`present.N.key`, `present_key_values…`):
/// fidelity leaves them out, as they are state handed to the next step, not predictions (and a
/// sliding-window cache holds whatever its buffer held beyond the prompt).
pub fn is_present_output(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with("present")
}

/// An empty cache for `input` with batch `batch` (zero past length).
pub fn empty_past(model: &Model, input: &ValueDesc, batch: usize) -> Result<Value> {
    let shape = input.shape.clone().unwrap_or_default();
    let unknown = |dim: &str, why: &str| {
        Error::Data(format!(
            "cannot tell dimension '{dim}' of the past key/value input '{}' ({why}); give the \
             input in the calibration .npz (shape [batch, kv_heads, 0, head_size])",
            input.name
        ))
    };
    let mut dims = Vec::with_capacity(shape.len());
    for (k, d) in shape.iter().enumerate() {
        let v = match (k, d.as_u64(), d.as_str()) {
            (0, _, _) => batch,
            (_, Some(v), _) => v as usize,
            (_, None, Some(name)) => {
                let l = name.to_ascii_lowercase();
                if let Some(w) = window(model, &input.name).filter(|_| l.contains("sliding")) {
                    // GroupQueryAttention's sliding-window cache is a fixed-capacity buffer of
                    // the window's size (onnxruntime refuses a smaller one); the attention
                    // mask, one per new token, says none of it is valid yet.
                    w
                } else if k == 2 || l.contains("past") || l.contains("seq") || l.contains("len") {
                    0
                } else if k == 3 {
                    head_size(model, &input.name).ok_or_else(|| {
                        unknown(
                            name,
                            "no attention node that consumes it tells the head size",
                        )
                    })?
                } else {
                    return Err(unknown(name, "not a batch, length or head-size axis"));
                }
            }
            (2, None, None) => 0,
            (_, None, None) => {
                if k == 3 {
                    head_size(model, &input.name)
                        .ok_or_else(|| unknown("?", "the head size is not declared"))?
                } else {
                    return Err(unknown("?", "the dimension is not declared"));
                }
            }
        };
        dims.push(v);
    }
    match input.dtype.as_str() {
        "float" | "float16" | "bfloat16" => Ok(Value::F32(ArrayD::zeros(IxDyn(&dims)))),
        other => Err(Error::Data(format!(
            "past key/value input '{}' has element type {other}; only float caches can be made",
            input.name
        ))),
    }
}

/// The `local_window_size` of the attention node that reads `cache`.
fn window(model: &Model, cache: &str) -> Option<usize> {
    let g = &model.graph;
    g.consumers(cache).iter().find_map(|&c| {
        node_attr(g.node(c)?, "local_window_size")
            .and_then(|a| a.i)
            .filter(|&w| w > 0)
            .map(|w| w as usize)
    })
}

/// The head size of the attention node that reads `cache`, from its query projection.
fn head_size(model: &Model, cache: &str) -> Option<usize> {
    let g = &model.graph;
    for &c in g.consumers(cache) {
        let n = g.node(c)?;
        let heads = |name: &str| node_attr(n, name).and_then(|a| a.i);
        let Some(q_heads) = heads("num_heads") else {
            continue;
        };
        // GroupQueryAttention packs Q, K and V in its first input when `key` is absent.
        let kv_heads = heads("kv_num_heads").unwrap_or(q_heads);
        let packed = n.input.get(1).is_none_or(|k| k.is_empty());
        let div = if packed {
            q_heads + 2 * kv_heads
        } else {
            q_heads
        };
        let query = n.input.first().and_then(|q| projection_columns(model, q));
        if let Some(cols) = query.filter(|&c| div > 0 && c % div == 0) {
            return Some((cols / div) as usize);
        }
        // Separate value input (LFM2: query and key pass through per-head norms, the value
        // is a plain slice of the fused projection): value columns / kv heads.
        if !packed {
            let value = n.input.get(2).and_then(|v| projection_columns(model, v));
            if let Some(cols) = value.filter(|&c| kv_heads > 0 && c % kv_heads == 0) {
                return Some((cols / kv_heads) as usize);
            }
        }
    }
    concat_head_size(model, cache)
}

/// The head size where the cache is concatenated (axis 2) with the new keys/values, as
/// decomposed attention does (onnxruntime-genai's float16 MultiHeadAttention path):
/// the other operand is `Transpose(Reshape(projection, [.., kv_heads, head_size or -1]))`.
fn concat_head_size(model: &Model, cache: &str) -> Option<usize> {
    let g = &model.graph;
    for &c in g.consumers(cache) {
        let n = g.node(c)?;
        if n.op_type.as_deref() != Some("Concat") {
            continue;
        }
        let axis = node_attr(n, "axis").and_then(|a| a.i);
        if !matches!(axis, Some(2 | -2)) {
            continue;
        }
        let other = n.input.iter().find(|i| *i != cache)?;
        let mut at = other.clone();
        for _ in 0..8 {
            let p = g.node(g.producer(&at)?)?;
            match p.op_type.as_deref() {
                // Head-wise ops between the projection and the cache (LFM2's per-head key
                // norm is reshaped to [.., head_size] around it).
                Some(
                    "Transpose"
                    | "Cast"
                    | "Identity"
                    | "RotaryEmbedding"
                    | "SimplifiedLayerNormalization",
                ) => at = p.input.first()?.clone(),
                Some("Reshape") => {
                    let shape = crate::moe::consts::const_ints(g, p.input.get(1)?)?;
                    let (&last, rest) = shape.split_last()?;
                    if last > 0 {
                        return Some(last as usize);
                    }
                    let heads = *rest.last()?;
                    let cols = projection_columns(model, p.input.first()?);
                    if let Some(cols) = cols {
                        return (heads > 0 && cols % heads == 0).then(|| (cols / heads) as usize);
                    }
                    at = p.input.first()?.clone();
                }
                _ => break,
            }
        }
    }
    None
}

/// Output columns of the MatMul (through a bias Add) that produces `value`.
fn projection_columns(model: &Model, value: &str) -> Option<i64> {
    let g = &model.graph;
    let mut at = value.to_string();
    for _ in 0..6 {
        let p = g.producer(&at)?;
        let n = g.node(p)?;
        match n.op_type.as_deref() {
            Some("Add") => {
                let data = n.input.iter().find(|i| !is_const(g, i))?;
                at = data.clone();
            }
            // Shape-preserving ops between the projection and the attention node.
            Some("RotaryEmbedding" | "Cast" | "Identity") => at = n.input.first()?.clone(),
            Some("MatMul") => {
                let w = n.input.get(1)?;
                let d = const_dims(g, w)?;
                return (d.len() == 2).then_some(d[1]);
            }
            // Quantised builder models: com.microsoft.MatMulNBits (attribute N = columns).
            Some("MatMulNBits") => {
                return node_attr(n, "N").and_then(|a| a.i);
            }
            // One slice of a fused projection split along its last axis: that slice's width.
            Some("Split") => {
                let axis = node_attr(n, "axis").and_then(|a| a.i).unwrap_or(0);
                let rank = 3; // [batch, seq, columns] as builders write it
                if axis != -1 && axis != rank - 1 {
                    return None;
                }
                let k = n.output.iter().position(|o| *o == at)?;
                let sizes = match n.input.get(1).filter(|s| !s.is_empty()) {
                    Some(s) => crate::moe::consts::const_ints(g, s)?,
                    None => node_attr(n, "split").map(|a| a.ints.clone())?,
                };
                return sizes.get(k).copied();
            }
            _ => return None,
        }
    }
    None
}

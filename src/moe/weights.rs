//! Reading the matrices a [`WeightRef`] describes, as f32 in canonical `[out, in]` order.
use super::block::{BiasRef, WeightRef};
use super::consts::const_proto;
use super::quant::Quant;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::onnx::tensor::{inline_bytes, to_f32};

fn tensor_f32(g: &Graph, name: &str) -> Result<(Vec<i64>, Vec<f32>)> {
    let bad = |reason: &str| Error::Tensor {
        tensor: name.to_string(),
        reason: reason.to_string(),
    };
    let t = const_proto(g, name).ok_or_else(|| bad("not a constant"))?;
    let bytes = match g.initializer(super::consts::through_identity(g, name)) {
        Some(i) => i.bytes()?,
        None => inline_bytes(t)?,
    };
    let data = to_f32(t.data_type.unwrap_or(0), &bytes)
        .ok_or_else(|| bad("not a floating-point tensor"))?;
    Ok((t.dims.clone(), data))
}

/// The raw bytes of a constant tensor, with its dims and element type.
fn tensor_bytes(g: &Graph, name: &str) -> Result<(Vec<i64>, i32, bytes::Bytes)> {
    let t = const_proto(g, name).ok_or_else(|| Error::Tensor {
        tensor: name.to_string(),
        reason: "not a constant".into(),
    })?;
    let bytes = match g.initializer(super::consts::through_identity(g, name)) {
        Some(i) => i.bytes()?,
        None => inline_bytes(t)?,
    };
    Ok((t.dims.clone(), t.data_type.unwrap_or(0), bytes))
}

/// One expert's stored `[rows, cols]` matrix of a QMoE code tensor, dequantised.
fn dequantized(g: &Graph, w: &WeightRef, q: &Quant) -> Result<(Vec<i64>, Vec<f32>)> {
    let (dims, dt, codes) = tensor_bytes(g, &w.tensor)?;
    let bad = |tensor: &str, reason: String| Error::Tensor {
        tensor: tensor.to_string(),
        reason,
    };
    if dt != crate::onnx::proto::tensor_proto::DataType::Uint8 as i32 {
        return Err(bad(&w.tensor, "QMoE weights are not uint8".into()));
    }
    let (n, rows, packed) = match (dims.as_slice(), w.expert) {
        ([n, r, c], Some(e)) if (e as i64) < *n => (*n as usize, *r as usize, *c as usize),
        _ => {
            return Err(bad(
                &w.tensor,
                format!("dims {dims:?} do not fit expert {:?}", w.expert),
            ))
        }
    };
    let cols = packed * q.pack();
    // Only this expert's scales are converted (the tensor holds every expert's).
    let (sdims, sdt, sbytes) = tensor_bytes(g, &q.scales)?;
    let nb = q.blocks(cols);
    let want: Vec<i64> = if sdims.len() == 2 {
        vec![n as i64, rows as i64]
    } else {
        vec![n as i64, rows as i64, nb as i64]
    };
    if sdims != want || (sdims.len() == 2 && nb != 1) {
        return Err(bad(
            &q.scales,
            format!("scales {sdims:?} do not fit codes {dims:?} ({nb} blocks per row)"),
        ));
    }
    let e = w.expert.unwrap_or(0);
    let per = rows * packed;
    let width = crate::onnx::dtype::bits(sdt).unwrap_or(0) as usize / 8;
    let range = e * rows * nb * width..(e + 1) * rows * nb * width;
    let scales = sbytes
        .get(range)
        .and_then(|b| crate::onnx::tensor::to_f32(sdt, b))
        .ok_or_else(|| bad(&q.scales, "scales are not a floating-point tensor".into()))?;
    let m = q.dequantize(&codes[e * per..(e + 1) * per], &scales, rows, cols);
    Ok((vec![rows as i64, cols as i64], m))
}

/// The canonical `[out, in]` matrix of a weight reference, row-major.
pub fn matrix(g: &Graph, w: &WeightRef) -> Result<Vec<f32>> {
    let (dims, data, expert) = match &w.quant {
        Some(q) => {
            let (d, m) = dequantized(g, w, q)?;
            (d, m, None)
        }
        None => {
            let (d, m) = tensor_f32(g, &w.tensor)?;
            (d, m, w.expert)
        }
    };
    let bad = |reason: String| Error::Tensor {
        tensor: w.tensor.clone(),
        reason,
    };
    let (r, c, base) = match (dims.as_slice(), expert) {
        ([r, c], None) => (*r as usize, *c as usize, 0),
        ([n, r, c], Some(e)) if (e as i64) < *n => {
            (*r as usize, *c as usize, e * (*r as usize) * (*c as usize))
        }
        _ => {
            return Err(bad(format!(
                "dims {dims:?} do not fit expert {:?}",
                w.expert
            )))
        }
    };
    let m = &data[base..base + r * c];
    // Canonical full matrix [R, C] before row selection.
    let (rr, cc) = if w.transpose { (c, r) } else { (r, c) };
    let at = |i: usize, j: usize| {
        if w.transpose {
            m[j * c + i]
        } else {
            m[i * c + j]
        }
    };
    let (start, step) = w.rows.map_or((0, 1), |s| (s.start, s.step));
    let [out, inp] = w.shape;
    if inp != cc || (out > 0 && start + step * (out - 1) >= rr) {
        return Err(bad(format!(
            "selection {out}x{inp} rows {start}+{step}k does not fit {rr}x{cc}"
        )));
    }
    let mut res = Vec::with_capacity(out * inp);
    for i in 0..out {
        let row = start + i * step;
        for j in 0..inp {
            res.push(at(row, j));
        }
    }
    finite(&w.tensor, &res)?;
    Ok(res)
}

/// Refuses NaN and infinite weights: statistics, merges and factorisations of them are
/// meaningless, and the rewritten model would look perfect against an original that
/// computes NaN.
fn finite(tensor: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Tensor {
            tensor: tensor.to_string(),
            reason: format!(
                "holds {} at element {i} of the part read; NaN or infinite weights cannot be \
                 merged or compressed (fix the checkpoint or the export)",
                v[i]
            ),
        }),
    }
}

/// The vector a bias reference describes.
pub fn vector(g: &Graph, b: &BiasRef) -> Result<Vec<f32>> {
    let (dims, data) = tensor_f32(g, &b.tensor)?;
    let row: &[f32] = match b.expert {
        None => &data,
        Some(e) => {
            let w = *dims.last().unwrap_or(&0) as usize;
            data.get(e * w..(e + 1) * w).ok_or_else(|| Error::Tensor {
                tensor: b.tensor.clone(),
                reason: format!("no row {e}"),
            })?
        }
    };
    let (start, step) = b.rows.map_or((0, 1), |s| (s.start, s.step));
    let v: Vec<f32> = row
        .iter()
        .skip(start)
        .step_by(step)
        .take(b.len)
        .copied()
        .collect();
    if v.len() != b.len {
        return Err(Error::Tensor {
            tensor: b.tensor.clone(),
            reason: format!("bias has fewer than {} values", b.len),
        });
    }
    finite(&b.tensor, &v)?;
    Ok(v)
}

/// An expert's weights in canonical orientation.
pub fn expert_params(
    g: &Graph,
    f: &super::Ffn,
) -> Result<crate::passes::merge_experts::ExpertParams> {
    let mat = |w: &super::WeightRef| -> Result<ndarray::Array2<f32>> {
        ndarray::Array2::from_shape_vec((w.shape[0], w.shape[1]), matrix(g, w)?).map_err(|e| {
            Error::Tensor {
                tensor: w.tensor.clone(),
                reason: e.to_string(),
            }
        })
    };
    let vec = |b: &Option<super::block::BiasRef>| -> Result<Option<ndarray::Array1<f32>>> {
        b.as_ref()
            .map(|b| vector(g, b).map(ndarray::Array1::from))
            .transpose()
    };
    Ok(crate::passes::merge_experts::ExpertParams {
        gate: f.gate.as_ref().map(mat).transpose()?,
        up: mat(&f.up)?,
        down: mat(&f.down)?,
        gate_bias: vec(&f.gate_bias)?,
        up_bias: vec(&f.up_bias)?,
        down_bias: vec(&f.down_bias)?,
    })
}

//! Tensor sizes and the bytes behind a `TensorProto`, whatever field holds them.
use super::dtype;
use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::TensorProto;
use crate::error::{Error, Result};
use bytes::Bytes;

/// Name of a tensor, or `<unnamed>`.
pub fn tensor_name(t: &TensorProto) -> &str {
    t.name.as_deref().unwrap_or("<unnamed>")
}

/// Number of elements of a tensor with these dims; an error on negative dims or overflow.
pub fn numel(name: &str, dims: &[i64]) -> Result<u64> {
    dims.iter().try_fold(1u64, |acc, &d| {
        let d = u64::try_from(d).map_err(|_| Error::Tensor {
            tensor: name.to_string(),
            reason: format!("negative dimension {d} in {dims:?}"),
        })?;
        acc.checked_mul(d).ok_or_else(|| Error::Tensor {
            tensor: name.to_string(),
            reason: format!("element count overflows for dims {dims:?}"),
        })
    })
}

/// Bytes this tensor's data occupies when stored raw (`None` for strings and unknown types).
pub fn declared_bytes(t: &TensorProto) -> Result<Option<u64>> {
    let n = numel(tensor_name(t), &t.dims)?;
    Ok(dtype::byte_len(t.data_type.unwrap_or(0), n))
}

/// Whether the tensor's data lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

/// The tensor's data as little-endian raw bytes, from `raw_data` or the typed fields.
/// External tensors must be resolved by the caller (see [`crate::onnx::ExternalStore`]).
pub fn inline_bytes(t: &TensorProto) -> Result<Bytes> {
    let name = tensor_name(t);
    let bad = |reason: String| Error::Tensor {
        tensor: name.to_string(),
        reason,
    };
    if is_external(t) {
        return Err(bad("data is external and was not resolved".into()));
    }
    let dt = t.data_type.unwrap_or(0);
    let expected = declared_bytes(t)?;
    let bytes = if let Some(raw) = &t.raw_data {
        raw.clone()
    } else {
        typed_to_raw(t, dt).map_err(bad)?
    };
    if let Some(e) = expected {
        if bytes.len() as u64 != e {
            return Err(bad(format!(
                "dims {:?} of {} need {e} bytes, data has {}",
                t.dims,
                dtype::name(dt),
                bytes.len()
            )));
        }
    }
    Ok(bytes)
}

/// Whether [`inline_bytes`] can read this element type from the typed fields.
pub fn typed_supported(dtype: i32) -> bool {
    use DataType as D;
    !matches!(
        DataType::try_from(dtype),
        Err(_)
            | Ok(D::Undefined | D::String | D::Complex64 | D::Complex128)
            | Ok(D::Uint4
                | D::Int4
                | D::Float4e2m1
                | D::Uint2
                | D::Int2
                | D::Float6e2m3
                | D::Float6e3m2)
    )
}

fn typed_to_raw(t: &TensorProto, dt: i32) -> Result<Bytes, String> {
    use DataType as D;
    let d = DataType::try_from(dt).map_err(|_| format!("unknown data type {dt}"))?;
    let mut out = Vec::new();
    match d {
        D::Float => t
            .float_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        D::Double => t
            .double_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        D::Int64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        D::Uint64 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        D::Uint32 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend((*v as u32).to_le_bytes())),
        D::Int32 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        D::Int16 | D::Uint16 | D::Float16 | D::Bfloat16 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend((*v as u16).to_le_bytes())),
        D::Int8
        | D::Uint8
        | D::Bool
        | D::Float8e4m3fn
        | D::Float8e4m3fnuz
        | D::Float8e5m2
        | D::Float8e5m2fnuz
        | D::Float8e8m0 => t.int32_data.iter().for_each(|v| out.push(*v as u8)),
        other => {
            return Err(format!(
                "typed-field storage of {} is not supported; store it as raw_data",
                other.as_str_name()
            ))
        }
    }
    Ok(Bytes::from(out))
}

/// Decodes raw little-endian bytes of a floating-point tensor into f32 values
/// (`float`, `double`, `float16`, `bfloat16`); `None` for other types.
pub fn to_f32(dtype: i32, bytes: &[u8]) -> Option<Vec<f32>> {
    use DataType as D;
    Some(match DataType::try_from(dtype).ok()? {
        D::Float => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        D::Double => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        D::Float16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        D::Bfloat16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

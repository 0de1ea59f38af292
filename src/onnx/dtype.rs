//! ONNX element types: names and storage sizes.
use super::proto::tensor_proto::DataType;

/// Storage size of one element in bits, or `None` for types without a fixed size
/// (strings, undefined, unknown codes).
pub fn bits(dtype: i32) -> Option<u64> {
    use DataType as D;
    let d = DataType::try_from(dtype).ok()?;
    Some(match d {
        D::Undefined | D::String => return None,
        D::Bool | D::Uint8 | D::Int8 => 8,
        D::Float8e4m3fn | D::Float8e4m3fnuz | D::Float8e5m2 | D::Float8e5m2fnuz | D::Float8e8m0 => {
            8
        }
        D::Uint16 | D::Int16 | D::Float16 | D::Bfloat16 => 16,
        D::Int32 | D::Uint32 | D::Float => 32,
        D::Int64 | D::Uint64 | D::Double | D::Complex64 => 64,
        D::Complex128 => 128,
        D::Uint4 | D::Int4 | D::Float4e2m1 => 4,
        D::Uint2 | D::Int2 => 2,
        D::Float6e2m3 | D::Float6e3m2 => 6,
    })
}

/// Lower-case ONNX name of an element type (`float`, `int64`, `bfloat16`, …).
pub fn name(dtype: i32) -> String {
    match DataType::try_from(dtype) {
        Ok(d) => d.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("dtype#{dtype}"),
    }
}

/// Number of bytes `numel` elements of `dtype` occupy in `raw_data` (sub-byte types packed).
pub fn byte_len(dtype: i32, numel: u64) -> Option<u64> {
    let b = bits(dtype)?;
    numel.checked_mul(b).map(|x| x.div_ceil(8))
}

//! float16 arrays in `.npy`/`.npz` files (numpy's `<f2`), which ndarray-npy does not read
//! itself: half-precision models' reference inputs and outputs are stored that way.
use ndarray_npy::{ReadDataError, ReadableElement};
use py_literal::Value as PyValue;
use std::io::Read;

/// One IEEE half-precision value as stored in a `.npy` file.
#[derive(Debug, Clone, Copy)]
pub struct F16(pub half::f16);

impl ReadableElement for F16 {
    fn read_to_end_exact_vec<R: Read>(
        mut reader: R,
        type_desc: &PyValue,
        len: usize,
    ) -> Result<Vec<Self>, ReadDataError> {
        let big = match type_desc {
            PyValue::String(s) if s == "<f2" || s == "=f2" || s == "f2" => false,
            PyValue::String(s) if s == ">f2" => true,
            other => return Err(ReadDataError::WrongDescriptor(other.clone())),
        };
        let mut bytes = vec![0u8; len * 2];
        reader.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ReadDataError::MissingData
            } else {
                ReadDataError::Io(e)
            }
        })?;
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map_err(ReadDataError::Io)?;
        if !rest.is_empty() {
            return Err(ReadDataError::ExtraBytes(rest.len()));
        }
        Ok(bytes
            .chunks_exact(2)
            .map(|c| {
                let b = [c[0], c[1]];
                F16(if big {
                    half::f16::from_be_bytes(b)
                } else {
                    half::f16::from_le_bytes(b)
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_and_big_endian_halves_and_refuses_other_types() {
        let le: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let v = F16::read_to_end_exact_vec(&le[..], &PyValue::String("<f2".into()), 2).unwrap();
        assert_eq!(
            v.iter().map(|h| h.0.to_f32()).collect::<Vec<_>>(),
            [1.5, -2.0]
        );
        let be: Vec<u8> = half::f16::from_f32(3.0).to_be_bytes().to_vec();
        let v = F16::read_to_end_exact_vec(&be[..], &PyValue::String(">f2".into()), 1).unwrap();
        assert_eq!(v[0].0.to_f32(), 3.0);
        assert!(F16::read_to_end_exact_vec(&le[..], &PyValue::String("<f4".into()), 1).is_err());
        assert!(matches!(
            F16::read_to_end_exact_vec(&le[..], &PyValue::String("<f2".into()), 1),
            Err(ReadDataError::ExtraBytes(2))
        ));
        assert!(matches!(
            F16::read_to_end_exact_vec(&le[..], &PyValue::String("<f2".into()), 3),
            Err(ReadDataError::MissingData)
        ));
    }
}

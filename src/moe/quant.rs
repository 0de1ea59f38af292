//! onnxruntime's `com.microsoft.QMoE` weight format: symmetric integer codes, block-wise
//! scales along the input axis.
//!
//! A projection `W` (`[out, in]`, the op's `[N, out, in/pack]` layout) is stored as unsigned
//! codes `q` of `bits` bits (4: two per byte, low nibble first; 8: one per byte) and one
//! scale per row and block of `block` inputs (`block = 0`: one per row), with the implicit
//! zero point `2^(bits−1)`:
//!
//! `W[r, c] = (q[r, c] − 2^(bits−1)) · scale[r, c / block]`.
//!
//! This is what onnxruntime's CPU kernel computes when no zero points are given (checked
//! against it in the tests). onnxruntime-genai writes two grids, told apart by the scales'
//! signs:
//! - signed scales (block-wise, MLAS's MatMulNBits grid): per block the element of largest
//!   magnitude `m` gives `scale = m / −2^(bits−1)`, so `m` is stored exactly as code 0;
//! - positive scales (one scale per row): `scale = max|w| / 2^(bits−1)`, so a negative extreme
//!   is exact and a positive one clipped to `2^(bits−1) − 1` steps. Requantising here uses
//!   `|m| / 2^(bits−1)` for a negative extreme and `m / (2^(bits−1) − 1)` for a positive one:
//!   the same scale for every block the builder wrote, and no clipping for new weights.
//!
//! Every element is then `q = clamp(round(w / scale) + 2^(bits−1), 0, 2^bits − 1)`, with the
//! scale first rounded to the scale tensor's type. Dequantised weights requantise to the same
//! codes and scales, so unchanged experts are written bit-exactly.
use serde::Serialize;

/// How one stacked QMoE weight tensor is quantised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quant {
    /// The scale tensor (`[N, out, blocks]`, or `[N, out]` for one scale per row).
    pub scales: String,
    /// Bits per code (4 or 8).
    pub bits: u32,
    /// Inputs per block (0: one block per row).
    pub block: usize,
    /// The signed-scale grid (some scale of the original is negative).
    pub signed: bool,
}

impl Quant {
    /// Codes per byte.
    pub fn pack(&self) -> usize {
        (8 / self.bits) as usize
    }

    /// The implicit zero point.
    pub fn zero(&self) -> i32 {
        1 << (self.bits - 1)
    }

    /// Scale blocks per row of `cols` inputs.
    pub fn blocks(&self, cols: usize) -> usize {
        if self.block == 0 {
            1
        } else {
            cols.div_ceil(self.block)
        }
    }

    /// Width of a block for rows of `cols` inputs.
    fn width(&self, cols: usize) -> usize {
        if self.block == 0 {
            cols.max(1)
        } else {
            self.block
        }
    }

    /// Dequantises a `[rows, cols]` matrix from its packed codes (`rows · cols / pack` bytes)
    /// and scales (`rows · blocks(cols)`).
    pub fn dequantize(&self, codes: &[u8], scales: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let (nb, w, z) = (self.blocks(cols), self.width(cols), self.zero());
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let q = match self.bits {
                    4 => {
                        let b = codes[(r * cols + c) / 2];
                        if c % 2 == 0 {
                            b & 15
                        } else {
                            b >> 4
                        }
                    }
                    _ => codes[r * cols + c],
                };
                out.push((i32::from(q) - z) as f32 * scales[r * nb + c / w]);
            }
        }
        out
    }

    /// Quantises a `[rows, cols]` matrix: packed codes and scales. `round_scale` rounds a
    /// scale to the scale tensor's type (identity for float32).
    pub fn quantize(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        round_scale: impl Fn(f32) -> f32,
    ) -> (Vec<u8>, Vec<f32>) {
        let (nb, width, z) = (self.blocks(cols), self.width(cols), self.zero());
        let qmax = (1i32 << self.bits) - 1;
        let mut codes = vec![0u8; rows * cols / self.pack()];
        let mut scales = Vec::with_capacity(rows * nb);
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            for b in 0..nb {
                let part = &row[b * width..((b + 1) * width).min(cols)];
                // The signed element of largest magnitude (positive first on ties).
                let m = part.iter().fold(0.0f32, |m, &x| {
                    if x.abs() > m.abs() || (x.abs() == m.abs() && x > m) {
                        x
                    } else {
                        m
                    }
                });
                let s = round_scale(if self.signed || m <= 0.0 {
                    m.abs() * if self.signed && m > 0.0 { -1.0 } else { 1.0 } / z as f32
                } else {
                    m / (z - 1) as f32
                });
                scales.push(s);
                let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
                for (j, &x) in part.iter().enumerate() {
                    let c = b * width + j;
                    let q = ((x * inv).round() as i32 + z).clamp(0, qmax) as u8;
                    match self.bits {
                        4 => codes[(r * cols + c) / 2] |= q << (4 * (c % 2)),
                        _ => codes[r * cols + c] = q,
                    }
                }
            }
        }
        (codes, scales)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(bits: u32, block: usize, signed: bool) -> Quant {
        Quant {
            scales: "s".into(),
            bits,
            block,
            signed,
        }
    }

    #[test]
    fn dequantized_weights_requantize_to_the_same_codes() {
        for (bits, block, signed) in [(4, 32, true), (4, 0, false), (8, 16, true), (8, 0, false)] {
            let qt = q(bits, block, signed);
            let (rows, cols) = (3, 40);
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 47.0) / 17.0)
                .collect();
            let (c1, s1) = qt.quantize(&w, rows, cols, |s| s);
            let d = qt.dequantize(&c1, &s1, rows, cols);
            let (c2, s2) = qt.quantize(&d, rows, cols, |s| s);
            assert_eq!((c1, s1), (c2, s2.clone()), "bits {bits} block {block}");
            // Rounding error at most half a step; the signed grid clips an opposite-sign
            // element of nearly the extreme's magnitude by up to one step.
            let step = |i: usize| s2[(i / cols) * qt.blocks(cols) + (i % cols) / qt.width(cols)];
            let tol = if signed { 1.0 } else { 0.5 };
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                assert!((a - b).abs() <= step(i).abs() * tol + 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn the_extreme_of_a_block_is_exact_and_nibbles_are_low_first() {
        let qt = q(4, 0, true);
        let w = [-2.0f32, 1.0, 0.5, 0.0];
        let (c, s) = qt.quantize(&w, 1, 4, |s| s);
        assert_eq!(s, vec![0.25]);
        // −2 → 0, 1 → 12, 0.5 → 10, 0 → 8
        assert_eq!(c, vec![12 << 4, 8 << 4 | 10]);
        assert_eq!(qt.dequantize(&c, &s, 1, 4), w.to_vec());
        // Signed grid, positive extreme: negative scale, the extreme is code 0.
        let (c, s) = qt.quantize(&[2.0, -1.0], 1, 2, |s| s);
        assert_eq!((c, s), (vec![12 << 4], vec![-0.25]));
        // Positive grid, positive extreme: 7 steps, no clipping.
        let pos = q(4, 0, false);
        let (c, s) = pos.quantize(&[7.0, -1.0], 1, 2, |s| s);
        assert_eq!((c.clone(), s.clone()), (vec![7 << 4 | 15], vec![1.0]));
        assert_eq!(pos.dequantize(&c, &s, 1, 2), vec![7.0, -1.0]);
    }

    #[test]
    fn positive_grids_written_by_the_builder_requantize_exactly() {
        // scale = max|w| / 8 with the positive extreme clipped at 7 steps.
        let pos = q(4, 0, false);
        let s = [0.5f32];
        for codes in [[15u8, 3, 8, 9], [0, 15, 8, 7], [9, 10, 0, 8]] {
            let packed = vec![codes[0] | codes[1] << 4, codes[2] | codes[3] << 4];
            let d = pos.dequantize(&packed, &s, 1, 4);
            assert_eq!(
                pos.quantize(&d, 1, 4, |s| s),
                (packed, s.to_vec()),
                "{codes:?}"
            );
        }
    }
}

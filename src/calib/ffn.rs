//! Evaluating an expert FFN in Rust from its described weights, for statistics on expert
//! outputs without asking the runtime for them. The weights are held as faer matrices,
//! converted once when the layer is loaded (not per batch); products are single-threaded
//! (callers run experts in parallel).
use crate::error::Result;
use crate::ir::Graph;
use crate::moe::weights::{matrix, vector};
use crate::moe::{Act, Ffn};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use ndarray::{Array2, ArrayView2};

/// One projection: weight `[out, in]` and optional bias `[out]`.
struct Linear {
    w: Mat<f32>,
    b: Option<Vec<f32>>,
}

impl Linear {
    fn load(
        g: &Graph,
        w: &crate::moe::WeightRef,
        b: &Option<crate::moe::block::BiasRef>,
    ) -> Result<Self> {
        let m = matrix(g, w)?;
        let cols = w.shape[1];
        Ok(Linear {
            w: Mat::from_fn(w.shape[0], cols, |i, j| m[i * cols + j]),
            b: b.as_ref().map(|b| vector(g, b)).transpose()?,
        })
    }

    /// `x·wᵀ + b` for `x` [rows, in].
    fn apply(&self, x: MatRef<f32>) -> Mat<f32> {
        let mut y = Mat::<f32>::zeros(x.nrows(), self.w.nrows());
        matmul(
            y.as_mut(),
            Accum::Replace,
            x,
            self.w.transpose(),
            1.0f32,
            Par::Seq,
        );
        if let Some(b) = &self.b {
            for (j, &bj) in b.iter().enumerate() {
                for v in y.col_mut(j).iter_mut() {
                    *v += bj;
                }
            }
        }
        y
    }
}

/// An FFN's weights as dense matrices (`[out, in]`) and bias vectors.
pub struct DenseFfn {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    act: Act,
}

impl DenseFfn {
    /// Loads the matrices of `f`.
    pub fn load(g: &Graph, f: &Ffn) -> Result<Self> {
        Ok(DenseFfn {
            gate: match &f.gate {
                Some(w) => Some(Linear::load(g, w, &f.gate_bias)?),
                None => None,
            },
            up: Linear::load(g, &f.up, &f.up_bias)?,
            down: Linear::load(g, &f.down, &f.down_bias)?,
            act: f.act,
        })
    }

    /// Outputs `[rows, H]` for inputs `[rows, H]`.
    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let xf = Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[[i, j]]);
        let up = self.up.apply(xf.as_ref());
        let h = match &self.gate {
            Some(g) => {
                let mut gt = g.apply(xf.as_ref());
                let act = self.act;
                for j in 0..gt.ncols() {
                    for (g, &u) in gt.col_mut(j).iter_mut().zip(up.col(j).iter()) {
                        *g = act.gated(*g, u);
                    }
                }
                gt
            }
            None => {
                let mut up = up;
                for j in 0..up.ncols() {
                    for v in up.col_mut(j).iter_mut() {
                        *v = self.act.eval(*v);
                    }
                }
                up
            }
        };
        let y = self.down.apply(h.as_ref());
        Array2::from_shape_fn((y.nrows(), y.ncols()), |(i, j)| y[(i, j)])
    }
}

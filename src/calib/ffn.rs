//! Evaluating an expert FFN in Rust from its described weights (f32 matrices), for
//! statistics on expert outputs without asking the runtime for them (products through faer,
//! single-threaded: callers run experts in parallel).
use crate::error::Result;
use crate::ir::Graph;
use crate::moe::weights::{matrix, vector};
use crate::moe::{Act, Ffn};
use ndarray::{Array1, Array2, ArrayView2, Axis};

/// An FFN's weights as dense matrices (`[out, in]`) and bias vectors.
pub struct DenseFfn {
    gate: Option<(Array2<f32>, Option<Array1<f32>>)>,
    up: (Array2<f32>, Option<Array1<f32>>),
    down: (Array2<f32>, Option<Array1<f32>>),
    act: Act,
}

fn mat(g: &Graph, w: &crate::moe::WeightRef) -> Result<Array2<f32>> {
    let m = matrix(g, w)?;
    Ok(Array2::from_shape_vec((w.shape[0], w.shape[1]), m).expect("shape checked by matrix()"))
}

fn vec_opt(g: &Graph, b: &Option<crate::moe::block::BiasRef>) -> Result<Option<Array1<f32>>> {
    b.as_ref()
        .map(|b| vector(g, b).map(Array1::from))
        .transpose()
}

impl DenseFfn {
    /// Loads the matrices of `f`.
    pub fn load(g: &Graph, f: &Ffn) -> Result<Self> {
        Ok(DenseFfn {
            gate: match &f.gate {
                Some(w) => Some((mat(g, w)?, vec_opt(g, &f.gate_bias)?)),
                None => None,
            },
            up: (mat(g, &f.up)?, vec_opt(g, &f.up_bias)?),
            down: (mat(g, &f.down)?, vec_opt(g, &f.down_bias)?),
            act: f.act,
        })
    }

    /// Intermediate activations `[rows, I]` (the down projection's input).
    pub fn hidden(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let lin = |(w, b): &(Array2<f32>, Option<Array1<f32>>)| {
            let mut y = crate::linalg::mul_t(x, w.view());
            if let Some(b) = b {
                y += b;
            }
            y
        };
        let up = lin(&self.up);
        match &self.gate {
            Some(g) => {
                let mut gt = lin(g);
                let act = self.act;
                gt.zip_mut_with(&up, |g, &u| *g = act.gated(*g, u));
                gt
            }
            None => up.mapv(|v| self.act.eval(v)),
        }
    }

    /// Outputs `[rows, H]` for inputs `[rows, H]`.
    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        self.project_down(self.hidden(x).view())
    }

    /// The down projection of intermediate activations.
    pub fn project_down(&self, h: ArrayView2<f32>) -> Array2<f32> {
        let (w, b) = &self.down;
        let mut y = crate::linalg::mul_t(h, w.view());
        if let Some(b) = b {
            y += b;
        }
        y
    }

    /// Intermediate size.
    pub fn intermediate(&self) -> usize {
        self.up.0.len_of(Axis(0))
    }
}

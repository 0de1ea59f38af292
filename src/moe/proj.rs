//! How one projection of a rewritten expert is stored, and the expert built from them.
//!
//! A projection is a canonical `[out, in]` matrix `W` (the block computes `x·Wᵀ`) kept as:
//! - [`Proj::Dense`]: `W` itself;
//! - [`Proj::LowRank`]: `W ≈ u·v` (`u` `[out, r]`, `v` `[r, in]`), written as two MatMuls;
//! - [`Proj::BaseDelta`]: `W ≈ B + u·v`, with `B` a base shared by several experts of the
//!   layer (stored once, in the layer's `bases`) and a low-rank delta of rank `r ≥ 0`.
//!
//! A kept subset of intermediate neurons is a [`ProjFfn`] whose intermediate size is
//! smaller than the original's (gate/up rows and down columns sliced), with `neurons`
//! saying which were kept. Every compression pass produces a [`ProjFfn`], the statistics
//! evaluate it ([`ProjFfn::forward`]), and the emitter writes it.
use super::Act;
use crate::passes::merge_experts::ExpertParams;
use ndarray::{Array1, Array2, ArrayView2};

/// One stored projection (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub enum Proj {
    /// `W` (`[out, in]`).
    Dense(Array2<f32>),
    /// `W ≈ u·v`.
    LowRank {
        /// `[out, r]`.
        u: Array2<f32>,
        /// `[r, in]`.
        v: Array2<f32>,
    },
    /// `W ≈ bases[base] + u·v`.
    BaseDelta {
        /// Index into the layer's shared bases.
        base: usize,
        /// `[out, r]` (r may be 0).
        u: Array2<f32>,
        /// `[r, in]`.
        v: Array2<f32>,
    },
}

impl Proj {
    /// Canonical shape `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Proj::Dense(w) => [w.nrows(), w.ncols()],
            Proj::LowRank { u, v } | Proj::BaseDelta { u, v, .. } => [u.nrows(), v.ncols()],
        }
    }

    /// Elements this projection stores itself (a shared base is counted once by its layer).
    pub fn stored(&self) -> usize {
        match self {
            Proj::Dense(w) => w.len(),
            Proj::LowRank { u, v } | Proj::BaseDelta { u, v, .. } => u.len() + v.len(),
        }
    }

    /// Multiply-adds per token.
    pub fn flops(&self) -> usize {
        let [o, i] = self.shape();
        match self {
            Proj::Dense(_) => o * i,
            Proj::LowRank { u, .. } => u.ncols() * (o + i),
            Proj::BaseDelta { u, .. } => o * i + u.ncols() * (o + i),
        }
    }

    /// The rank of a factored projection.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Proj::Dense(_) => None,
            Proj::LowRank { u, .. } | Proj::BaseDelta { u, .. } => Some(u.ncols()),
        }
    }

    /// The form's name in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Proj::Dense(_) => "dense",
            Proj::LowRank { .. } => "low-rank",
            Proj::BaseDelta { .. } => "base+delta",
        }
    }

    /// The matrix it stands for.
    pub fn dense(&self, bases: &[Array2<f32>]) -> Array2<f32> {
        match self {
            Proj::Dense(w) => w.clone(),
            Proj::LowRank { u, v } => u.dot(v),
            Proj::BaseDelta { base, u, v } => &bases[*base] + &u.dot(v),
        }
    }

    /// `x·Ŵᵀ` for rows `x` (`[rows, in]`).
    pub fn apply(&self, x: ArrayView2<f32>, bases: &[Array2<f32>]) -> Array2<f32> {
        use crate::linalg::mul_t;
        match self {
            Proj::Dense(w) => mul_t(x, w.view()),
            Proj::LowRank { u, v } => mul_t(mul_t(x, v.view()).view(), u.view()),
            Proj::BaseDelta { base, u, v } => {
                let mut y = mul_t(x, bases[*base].view());
                if u.ncols() > 0 {
                    y += &mul_t(mul_t(x, v.view()).view(), u.view());
                }
                y
            }
        }
    }
}

/// An expert FFN whose projections are [`Proj`]s.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjFfn {
    /// Gate projection `[I', H]` (gated FFNs).
    pub gate: Option<Proj>,
    /// Up projection `[I', H]`.
    pub up: Proj,
    /// Down projection `[H, I']`.
    pub down: Proj,
    /// Gate bias `[I']`.
    pub gate_bias: Option<Array1<f32>>,
    /// Up bias `[I']`.
    pub up_bias: Option<Array1<f32>>,
    /// Down bias `[H]`.
    pub down_bias: Option<Array1<f32>>,
    /// The nonlinearity.
    pub act: Act,
    /// Intermediate neurons of the original expert that were kept (None: all, in order).
    pub neurons: Option<Vec<usize>>,
}

impl ProjFfn {
    /// Dense projections of `p`.
    pub fn dense(p: ExpertParams, act: Act) -> Self {
        ProjFfn {
            gate: p.gate.map(Proj::Dense),
            up: Proj::Dense(p.up),
            down: Proj::Dense(p.down),
            gate_bias: p.gate_bias,
            up_bias: p.up_bias,
            down_bias: p.down_bias,
            act,
            neurons: None,
        }
    }

    /// Moves the dense weights out (as [`ProjFfn::as_dense`] would copy them), leaving empty
    /// matrices in their place and the biases, activation and kept neurons as they are; `None`
    /// (and nothing moved) when a projection is not dense. [`ProjFfn::with_dense`] puts
    /// weights back.
    pub fn take_dense(&mut self) -> Option<ExpertParams> {
        let dense = |p: &Proj| matches!(p, Proj::Dense(_));
        if !(dense(&self.up) && dense(&self.down) && self.gate.as_ref().is_none_or(dense)) {
            return None;
        }
        let take = |p: &mut Proj| match p {
            Proj::Dense(w) => std::mem::take(w),
            _ => unreachable!("checked dense above"),
        };
        Some(ExpertParams {
            gate: self.gate.as_mut().map(take),
            up: take(&mut self.up),
            down: take(&mut self.down),
            gate_bias: self.gate_bias.clone(),
            up_bias: self.up_bias.clone(),
            down_bias: self.down_bias.clone(),
        })
    }

    /// This FFN with `p`'s dense weights (and biases) in place of its projections.
    pub fn with_dense(&self, p: &ExpertParams) -> ProjFfn {
        ProjFfn {
            neurons: self.neurons.clone(),
            ..ProjFfn::dense(p.clone(), self.act)
        }
    }

    /// The dense parameters when every projection is dense (what the fused op can hold).
    pub fn as_dense(&self) -> Option<ExpertParams> {
        let d = |p: &Proj| match p {
            Proj::Dense(w) => Some(w.clone()),
            _ => None,
        };
        Some(ExpertParams {
            gate: match &self.gate {
                Some(g) => Some(d(g)?),
                None => None,
            },
            up: d(&self.up)?,
            down: d(&self.down)?,
            gate_bias: self.gate_bias.clone(),
            up_bias: self.up_bias.clone(),
            down_bias: self.down_bias.clone(),
        })
    }

    /// The dense parameters it stands for.
    pub fn to_params(&self, bases: &[Array2<f32>]) -> ExpertParams {
        ExpertParams {
            gate: self.gate.as_ref().map(|g| g.dense(bases)),
            up: self.up.dense(bases),
            down: self.down.dense(bases),
            gate_bias: self.gate_bias.clone(),
            up_bias: self.up_bias.clone(),
            down_bias: self.down_bias.clone(),
        }
    }

    /// Intermediate size.
    pub fn intermediate(&self) -> usize {
        self.up.shape()[0]
    }

    /// The projections, named.
    pub fn projs(&self) -> Vec<(&'static str, &Proj)> {
        let mut v = Vec::new();
        if let Some(g) = &self.gate {
            v.push(("gate", g));
        }
        v.push(("up", &self.up));
        v.push(("down", &self.down));
        v
    }

    /// Elements it stores (shared bases excluded; biases included).
    pub fn stored(&self) -> usize {
        let b = |b: &Option<Array1<f32>>| b.as_ref().map_or(0, Array1::len);
        self.projs().iter().map(|(_, p)| p.stored()).sum::<usize>()
            + b(&self.gate_bias)
            + b(&self.up_bias)
            + b(&self.down_bias)
    }

    /// Multiply-adds per routed token.
    pub fn flops(&self) -> usize {
        self.projs().iter().map(|(_, p)| p.flops()).sum()
    }

    /// The down projection's input `[rows, I']` for inputs `x` (`[rows, H]`).
    pub fn hidden(&self, x: ArrayView2<f32>, bases: &[Array2<f32>]) -> Array2<f32> {
        let lin = |p: &Proj, b: &Option<Array1<f32>>| {
            let mut y = p.apply(x, bases);
            if let Some(b) = b {
                y += b;
            }
            y
        };
        let up = lin(&self.up, &self.up_bias);
        match &self.gate {
            Some(g) => {
                let mut gt = lin(g, &self.gate_bias);
                let act = self.act;
                gt.zip_mut_with(&up, |g, &u| *g = act.gated(*g, u));
                gt
            }
            None => up.mapv(|v| self.act.eval(v)),
        }
    }

    /// Outputs `[rows, H]`.
    pub fn forward(&self, x: ArrayView2<f32>, bases: &[Array2<f32>]) -> Array2<f32> {
        let h = self.hidden(x, bases);
        let mut y = self.down.apply(h.view(), bases);
        if let Some(b) = &self.down_bias {
            y += b;
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::base_delta::base_delta;
    use crate::passes::merge_experts::merge_weighted;
    use ndarray::{array, Array2};

    fn expert(s: f32) -> ExpertParams {
        ExpertParams {
            gate: Some(array![[s, 1.0], [2.0, -s], [0.5, s]]),
            up: array![[s, 0.0], [1.0, 1.0], [-1.0, s]],
            down: array![[1.0, s, 0.0], [s, 2.0, 1.0]],
            gate_bias: None,
            up_bias: None,
            down_bias: Some(array![0.1, -0.2]),
        }
    }

    #[test]
    fn dense_weights_move_out_and_back() {
        let mut f = ProjFfn::dense(expert(1.5), Act::Silu);
        f.neurons = Some(vec![0, 2, 4]);
        let orig = f.clone();
        let p = f.take_dense().unwrap();
        assert_eq!(p, orig.as_dense().unwrap());
        assert_eq!(f.up, Proj::Dense(Array2::zeros((0, 0))));
        assert_eq!(f.with_dense(&p), orig);
        // Not dense: nothing moves.
        let mut g = orig.clone();
        g.down = Proj::LowRank {
            u: Array2::zeros((2, 1)),
            v: Array2::zeros((1, 3)),
        };
        let before = g.clone();
        assert!(g.take_dense().is_none());
        assert_eq!(g, before);
    }

    #[test]
    fn rank_zero_deltas_are_the_plain_merge() {
        let (a, b) = (expert(1.0), expert(-2.0));
        let (base, _) = base_delta(&[&a, &b], &[0.7, 0.3]);
        let bases = vec![
            base.gate.clone().unwrap(),
            base.up.clone(),
            base.down.clone(),
        ];
        let z = |o: usize, i: usize| Proj::BaseDelta {
            base: 0,
            u: Array2::zeros((o, 0)),
            v: Array2::zeros((0, i)),
        };
        let mut f = ProjFfn::dense(a.clone(), Act::Silu);
        f.gate = Some(z(3, 2));
        f.up = Proj::BaseDelta {
            base: 1,
            u: Array2::zeros((3, 0)),
            v: Array2::zeros((0, 2)),
        };
        f.down = Proj::BaseDelta {
            base: 2,
            u: Array2::zeros((2, 0)),
            v: Array2::zeros((0, 3)),
        };
        f.down_bias = base.down_bias.clone();
        let merged = merge_weighted(&[&a, &b], &[0.7, 0.3]);
        assert_eq!(f.to_params(&bases), merged);
        let x = array![[0.3f32, -1.0], [2.0, 0.5]];
        let want = ProjFfn::dense(merged, Act::Silu).forward(x.view(), &[]);
        let got = f.forward(x.view(), &bases);
        for (p, q) in got.iter().zip(want.iter()) {
            assert!((p - q).abs() < 1e-6);
        }
        assert_eq!(f.stored(), 2, "only the bias is stored: the base is shared");
    }

    #[test]
    fn low_rank_apply_equals_the_product() {
        let u = array![[1.0f32, 0.0], [2.0, 1.0], [0.0, -1.0]];
        let v = array![[0.5f32, 1.0, 0.0, 2.0], [1.0, -1.0, 1.0, 0.0]];
        let p = Proj::LowRank {
            u: u.clone(),
            v: v.clone(),
        };
        let x = array![[1.0f32, 2.0, 3.0, 4.0]];
        let want = x.dot(&u.dot(&v).t());
        assert_eq!(p.apply(x.view(), &[]), want);
        assert_eq!(p.stored(), 6 + 8);
        assert_eq!(p.flops(), 2 * (3 + 4));
        assert_eq!(p.shape(), [3, 4]);
    }
}

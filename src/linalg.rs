//! The few dense linear-algebra kernels the compression passes need, on `faer`: products,
//! Grams, Cholesky-whitened SVDs and ridge least squares. Decompositions run in f64 (the
//! whitening squares condition numbers); weights go back to f32 for the model.
//!
//! Every call here is single-threaded (`Par::Seq`): callers parallelise across experts with
//! rayon, which keeps all cores busy without oversubscribing them.
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par, Side};
use ndarray::{Array2, ArrayView2};

/// An f32 ndarray matrix as an f64 faer matrix.
pub fn to_faer(a: ArrayView2<f32>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| f64::from(a[[i, j]]))
}

/// An f64 ndarray matrix as a faer matrix.
pub fn to_faer64(a: ArrayView2<f64>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[[i, j]])
}

/// A faer matrix as an f32 ndarray matrix.
pub fn to_nd(a: MatRef<f64>) -> Array2<f32> {
    Array2::from_shape_fn((a.nrows(), a.ncols()), |(i, j)| a[(i, j)] as f32)
}

/// `a·b`.
pub fn mul(a: MatRef<f64>, b: MatRef<f64>) -> Mat<f64> {
    let mut c = Mat::zeros(a.nrows(), b.ncols());
    matmul(c.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    c
}

/// `x·wᵀ` for f32 ndarray matrices (`x` [rows, in], `w` [out, in]), through faer.
pub fn mul_t(x: ArrayView2<f32>, w: ArrayView2<f32>) -> Array2<f32> {
    let xf = Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[[i, j]]);
    let wf = Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[[i, j]]);
    let mut c = Mat::<f32>::zeros(x.nrows(), w.nrows());
    matmul(
        c.as_mut(),
        Accum::Replace,
        xf.as_ref(),
        wf.transpose(),
        1.0f32,
        Par::Seq,
    );
    Array2::from_shape_fn((x.nrows(), w.nrows()), |(i, j)| c[(i, j)])
}

/// The Gram `xᵀ·x` of rows `x` ([n, d] → [d, d]), each row weighted by `w` when given.
/// Only the lower triangle is computed (half the work of a full product), then mirrored.
pub fn gram(x: ArrayView2<f32>, w: Option<&[f64]>) -> Mat<f64> {
    let xf = Mat::from_fn(x.nrows(), x.ncols(), |i, j| {
        f64::from(x[[i, j]]) * w.map_or(1.0, |w| w[i].sqrt())
    });
    let d = x.ncols();
    let mut g = Mat::<f64>::zeros(d, d);
    lower_gram(g.as_mut(), xf.as_ref(), Accum::Replace);
    for j in 0..d {
        for i in 0..j {
            g[(i, j)] = g[(j, i)];
        }
    }
    g
}

/// Adds the lower triangle of `xᵀ·x` (rows `x`, [n, d]) to that of `g` ([d, d]); the upper
/// triangle is left as it is (the caller mirrors).
pub fn gram_add(g: faer::MatMut<f64>, x: ArrayView2<f32>) {
    let xf = Mat::from_fn(x.nrows(), x.ncols(), |i, j| f64::from(x[[i, j]]));
    lower_gram(g, xf.as_ref(), Accum::Add);
}

/// The lower triangle of `xfᵀ·xf` into `g` (replacing or adding to it).
fn lower_gram(g: faer::MatMut<f64>, xf: MatRef<f64>, accum: Accum) {
    triangular::matmul(
        g,
        BlockStructure::TriangularLower,
        accum,
        xf.transpose(),
        BlockStructure::Rectangular,
        xf,
        BlockStructure::Rectangular,
        1.0,
        Par::Seq,
    );
}

/// `Lᵀ·b` for a lower-triangular `l` (only its lower triangle is read: half a full product).
fn lt_mul(l: MatRef<f64>, b: MatRef<f64>) -> Mat<f64> {
    let mut c = Mat::zeros(l.ncols(), b.ncols());
    triangular::matmul(
        c.as_mut(),
        BlockStructure::Rectangular,
        Accum::Replace,
        l.transpose(),
        BlockStructure::TriangularUpper,
        b,
        BlockStructure::Rectangular,
        1.0,
        Par::Seq,
    );
    c
}

/// Ridge added to a Gram before factoring: `λ = rel · tr(G)/d` (at least a tiny absolute
/// floor, so an all-zero Gram still factors).
pub fn ridge(g: MatRef<f64>, rel: f64) -> f64 {
    let d = g.nrows().max(1);
    let tr: f64 = (0..g.nrows()).map(|i| g[(i, i)]).sum();
    (rel * tr / d as f64).max(1e-12)
}

/// The lower Cholesky factor L of `g + λI` (`g = L·Lᵀ`), retrying with a larger ridge if
/// rounding makes the matrix indefinite.
pub fn cholesky(g: MatRef<f64>, rel: f64) -> Mat<f64> {
    let mut a = g.to_owned();
    llt_ridged(&mut a, ridge(g, rel)).L().to_owned()
}

/// The Cholesky factorisation of `a + λI`, adding `λ` to `a`'s diagonal in place (no copy of
/// `a`) and growing it tenfold until the factorisation succeeds.
fn llt_ridged(a: &mut Mat<f64>, lambda: f64) -> faer::linalg::solvers::Llt<f64> {
    let mut added = 0.0;
    let mut lambda = lambda;
    loop {
        for i in 0..a.nrows() {
            a[(i, i)] += lambda - added;
        }
        added = lambda;
        if let Ok(llt) = a.llt(Side::Lower) {
            return llt;
        }
        lambda *= 10.0;
    }
}

/// An activation-aware (whitened) SVD of one projection: for inputs with Gram `G = L·Lᵀ`,
/// `Lᵀ·Wᵀ = U·Σ·Vᵀ`; keeping `r` terms gives the rank-`r` `Ŵ` minimising `‖X·Wᵀ − X·Ŵᵀ‖_F`.
pub struct WhitenedSvd {
    /// Singular values of `Lᵀ·Wᵀ` (non-increasing): σ²_i is the squared output error
    /// (over the Gram's tokens) that dropping term i adds.
    pub sigma: Vec<f64>,
    /// `L⁻ᵀ·U·Σ` (`[in, p]`): the input-side factor of every term, in float32 (what the
    /// written factors hold: kept in float64 they took twice the memory of the model's
    /// float32 weights, for every layer at once while ranks are allocated).
    left: Array2<f32>,
    /// `V` (`[out, p]`), float32.
    right: Array2<f32>,
}

impl WhitenedSvd {
    /// Decomposes the canonical `w` (`[out, in]`) under the input Gram `g` (`[in, in]`).
    pub fn new(w: ArrayView2<f32>, g: MatRef<f64>, rel_ridge: f64) -> Self {
        let l = cholesky(g, rel_ridge);
        let wt = to_faer(w).transpose().to_owned(); // [in, out]
        let lw = lt_mul(l.as_ref(), wt.as_ref()); // Lᵀ·Wᵀ
        let (u, s, v) = match lw.thin_svd() {
            Ok(svd) => (
                svd.U().to_owned(),
                svd.S()
                    .column_vector()
                    .iter()
                    .copied()
                    .collect::<Vec<f64>>(),
                svd.V().to_owned(),
            ),
            // Non-convergence (NaN/Inf weights): an empty spectrum; callers keep it dense.
            Err(_) => (Mat::zeros(lw.nrows(), 0), vec![], Mat::zeros(lw.ncols(), 0)),
        };
        let p = s.len();
        let mut us = Mat::from_fn(u.nrows(), p, |i, j| u[(i, j)] * s[j]);
        // L⁻ᵀ·(U·Σ): solve Lᵀ·Y = U·Σ (upper triangular).
        l.transpose().solve_upper_triangular_in_place(us.as_mut());
        WhitenedSvd {
            sigma: s,
            left: Array2::from_shape_fn((us.nrows(), p), |(i, j)| us[(i, j)] as f32),
            right: Array2::from_shape_fn((v.nrows(), v.ncols()), |(i, j)| v[(i, j)] as f32),
        }
    }

    /// Drops the factors past the break-even rank (`in·out/(in+out)`, where a factored
    /// matrix stores no less than the dense one: no plan writes them); the spectrum stays
    /// whole. A quarter less memory for a square-ish matrix, held while ranks are allocated.
    pub fn to_break_even(self) -> Self {
        let (out, inp) = (self.right.nrows(), self.left.nrows());
        let p = self.left.ncols().min(out * inp / (out + inp).max(1) + 1);
        if p == self.left.ncols() {
            return self;
        }
        WhitenedSvd {
            sigma: self.sigma,
            left: self.left.slice(ndarray::s![.., ..p]).to_owned(),
            right: self.right.slice(ndarray::s![.., ..p]).to_owned(),
        }
    }

    /// The rank-`r` factors in canonical orientation: `u` (`[out, r]`), `v` (`[r, in]`), with
    /// `W ≈ u·v`.
    pub fn factors(&self, r: usize) -> (Array2<f32>, Array2<f32>) {
        let r = r.min(self.left.ncols());
        let u = self.right.slice(ndarray::s![.., ..r]).to_owned();
        let v = self.left.slice(ndarray::s![.., ..r]).t().to_owned();
        (u, v)
    }
}

/// Ridge least squares toward a prior: `argmin_W ‖A·W − T‖² + λ‖W − P‖²` with `A` [n, p],
/// `T`, `P` [n|p, q] given as `AᵀA` (`[p, p]`), `AᵀT` (`[p, q]`) and `P`.
/// `λ = rel · tr(AᵀA)/p`. Returns `W` (`[p, q]`).
pub fn ridge_solve(ata: Mat<f64>, att: MatRef<f64>, prior: MatRef<f64>, rel: f64) -> Mat<f64> {
    // Factored in place of `ata` (taken by value): at I' = 16384 each [I', I'] float64 copy
    // is 2 GiB, and a layer-by-layer run bounds its memory by a few of them.
    let lambda = ridge(ata.as_ref(), rel);
    let mut a = ata;
    for i in 0..a.nrows() {
        a[(i, i)] += lambda;
    }
    // As `cholesky(a, 0.0)`: a tiny extra ridge, grown until the factorisation succeeds.
    let extra = ridge(a.as_ref(), 0.0);
    let llt = llt_ridged(&mut a, extra);
    drop(a);
    let mut rhs = Mat::from_fn(att.nrows(), att.ncols(), |i, j| {
        att[(i, j)] + lambda * prior[(i, j)]
    });
    let l = llt.L();
    l.solve_lower_triangular_in_place(rhs.as_mut());
    l.transpose().solve_upper_triangular_in_place(rhs.as_mut());
    rhs
}

/// A deterministic pseudo-random `[r, c]` matrix with entries in [-1, 1] (unit tests).
#[cfg(test)]
pub(crate) fn test_matrix(seed: u64, r: usize, c: usize) -> Array2<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    Array2::from_shape_fn((r, c), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % 20001) as f32 / 10000.0 - 1.0
    })
}

#[cfg(test)]
mod tests {
    use super::test_matrix as rnd;
    use super::*;

    #[test]
    fn full_rank_whitened_svd_reproduces_the_matrix() {
        let w = rnd(1, 6, 5);
        let x = rnd(2, 40, 5);
        let g = gram(x.view(), None);
        let s = WhitenedSvd::new(w.view(), g.as_ref(), 1e-9);
        let (u, v) = s.factors(5);
        let back = u.dot(&v);
        for (a, b) in back.iter().zip(w.iter()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn break_even_keeps_every_rank_a_plan_can_write() {
        // 12×8: break-even rank 12·8/20 = 4 (rank 5 would store 100 elements > 96).
        let w = rnd(21, 12, 8);
        let x = rnd(22, 60, 8);
        let g = gram(x.view(), None);
        let full = WhitenedSvd::new(w.view(), g.as_ref(), 1e-9);
        let cut = WhitenedSvd::new(w.view(), g.as_ref(), 1e-9).to_break_even();
        assert_eq!(cut.sigma, full.sigma);
        for r in 0..=4 {
            assert_eq!(full.factors(r), cut.factors(r), "rank {r}");
        }
        assert_eq!(cut.factors(8).0.ncols(), 5);
    }

    #[test]
    fn truncation_error_is_the_dropped_energy() {
        // ‖X·Wᵀ − X·Ŵᵀ‖² = Σ_{i>r} σ_i² (up to the ridge).
        let w = rnd(3, 8, 6);
        let x = rnd(4, 100, 6);
        let g = gram(x.view(), None);
        let s = WhitenedSvd::new(w.view(), g.as_ref(), 1e-12);
        for r in 0..=6 {
            let (u, v) = s.factors(r);
            let d = x.dot(&w.t()) - x.dot(&u.dot(&v).t());
            let err: f64 = d.iter().map(|&e| f64::from(e).powi(2)).sum();
            let want: f64 = s.sigma[r..].iter().map(|v| v * v).sum();
            assert!(
                (err - want).abs() <= 1e-3 * want.max(1.0),
                "r {r}: {err} vs {want}"
            );
        }
    }

    #[test]
    fn planted_low_rank_matrix_is_recovered_to_the_noise_floor() {
        // W = A·B (rank 3) + noise of 1e-4: rank 3 recovers W to the noise, and the spectrum
        // beyond 3 is noise.
        let (a, b) = (rnd(11, 24, 3), rnd(12, 3, 16));
        let noise = rnd(13, 24, 16) * 1e-4;
        let w = a.dot(&b) + &noise;
        let x = rnd(14, 200, 16);
        let g = gram(x.view(), None);
        let s = WhitenedSvd::new(w.view(), g.as_ref(), 1e-9);
        let (u, v) = s.factors(3);
        let err = (&u.dot(&v) - &a.dot(&b)).mapv(|e| e * e).sum().sqrt();
        let floor = noise.mapv(|e| e * e).sum().sqrt();
        assert!(err <= 2.0 * floor, "{err} vs noise {floor}");
        assert!(s.sigma[3] < 1e-3 * s.sigma[2], "{:?}", &s.sigma[..5]);
    }

    #[test]
    fn ridge_solve_is_least_squares() {
        let a = rnd(5, 50, 4);
        let wt = rnd(6, 4, 3);
        let t = a.dot(&wt);
        let af = to_faer(a.view());
        let ata = mul(af.transpose(), af.as_ref());
        let att = mul(af.transpose(), to_faer(t.view()).as_ref());
        let w = ridge_solve(ata, att.as_ref(), Mat::zeros(4, 3).as_ref(), 1e-10);
        for i in 0..4 {
            for j in 0..3 {
                assert!((w[(i, j)] - f64::from(wt[[i, j]])).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn mul_t_matches_ndarray() {
        let x = rnd(7, 5, 4);
        let w = rnd(8, 3, 4);
        let a = mul_t(x.view(), w.view());
        let b = x.dot(&w.t());
        for (p, q) in a.iter().zip(b.iter()) {
            assert!((p - q).abs() < 1e-5);
        }
    }
}

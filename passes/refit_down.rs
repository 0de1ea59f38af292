//! refit_down — least-squares refit of an expert's down projection on calibration tokens.
//!
//! What: given the down projection's inputs `A` (`[n, I']`, e.g. a pruned expert's kept
//! activations, or a merged expert's activations scaled by the group's routing weight) and
//! the outputs it should produce `T` (`[n, H]`, bias removed), solve
//! `W = argmin ‖A·Wᵀ − T‖² + λ‖W − P‖²` toward the prior `P` (the down projection before
//! the refit), `λ = rel · tr(AᵀA)/I'`. The ridge toward `P` keeps the fit sane when the
//! calibration rows are few; when `P` already fits `T` exactly (a singleton group, nothing
//! pruned) the refit returns `P`.
//! Preconditions: `A`, `T` have the same rows; `P` is `[H, I']`.
//! Limits: normal equations in f64 through faer (Cholesky); `I'` up to a few thousand.
//!
//! Before/after: down `[H, I']` → down `[H, I']` with a smaller calibrated output error.

use crate::linalg::{mul, ridge_solve, to_faer};
use ndarray::{Array2, ArrayView2};

/// The refitted down projection (`[H, I']`).
pub fn refit_down(
    a: ArrayView2<f32>,
    t: ArrayView2<f32>,
    prior: ArrayView2<f32>,
    rel: f64,
) -> Array2<f32> {
    if a.nrows() == 0 {
        return prior.to_owned();
    }
    let af = to_faer(a);
    let ata = mul(af.transpose(), af.as_ref());
    let att = mul(af.transpose(), to_faer(t).as_ref());
    let p = to_faer(prior.t());
    let w = ridge_solve(ata, att.as_ref(), p.as_ref(), rel); // [I', H]
    Array2::from_shape_fn((prior.nrows(), prior.ncols()), |(i, j)| w[(j, i)] as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::test_matrix as rnd;

    #[test]
    fn exact_prior_is_kept() {
        let a = rnd(1, 30, 5);
        let w = rnd(2, 3, 5);
        let t = a.dot(&w.t());
        let r = refit_down(a.view(), t.view(), w.view(), 0.1);
        for (x, y) in r.iter().zip(w.iter()) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn recovers_the_target_map() {
        let a = rnd(3, 200, 6);
        let w = rnd(4, 4, 6);
        let t = a.dot(&w.t());
        let prior = Array2::<f32>::zeros((4, 6));
        let r = refit_down(a.view(), t.view(), prior.view(), 1e-9);
        for (x, y) in r.iter().zip(w.iter()) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
    }
}

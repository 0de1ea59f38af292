//! base_delta — a shared base plus per-expert deltas.
//!
//! What: the base of a set of experts is their weighted average (weights ∝ usage
//! frequency; uniform when all are zero), matrix by matrix; each expert's delta is
//! `W_e − B`. The caller factors every delta with the expert's own activation-aware SVD
//! (rank chosen by `allocate_ranks`), so expert e is written `x·Bᵀ + (x·v_eᵀ)·u_eᵀ`, the base
//! stored once. With every delta at rank 0 this is the plain frequency-weighted merge; at
//! full rank it is exact.
//! Preconditions: members have the same shapes and gating.
//! Limits: no neuron alignment (it did not help on the measured models; align first if the
//! experts are permuted copies).
//!
//! Before/after: experts W_1..W_n → B, D_1..D_n with W_e = B + D_e.

use crate::passes::merge_experts::{merge_weighted, ExpertParams};
use ndarray::Array2;

/// The base and each member's deltas (gate, up, down), in member order.
pub type Deltas = Vec<(Option<Array2<f32>>, Array2<f32>, Array2<f32>)>;

/// The weighted base of `members` and their deltas.
pub fn base_delta(members: &[&ExpertParams], w: &[f64]) -> (ExpertParams, Deltas) {
    let base = merge_weighted(members, w);
    let deltas = members
        .iter()
        .map(|m| {
            (
                m.gate.as_ref().zip(base.gate.as_ref()).map(|(g, b)| g - b),
                &m.up - &base.up,
                &m.down - &base.down,
            )
        })
        .collect();
    (base, deltas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn base_plus_delta_is_the_expert() {
        let e = |s: f32| ExpertParams {
            gate: Some(array![[s, 1.0], [2.0, s]]),
            up: array![[s, 0.0], [1.0, 1.0]],
            down: array![[1.0, s], [s, 2.0]],
            gate_bias: None,
            up_bias: None,
            down_bias: None,
        };
        let (a, b) = (e(1.0), e(3.0));
        let (base, d) = base_delta(&[&a, &b], &[3.0, 1.0]);
        assert_eq!(base.up[[0, 0]], 1.5);
        assert_eq!(&base.down + &d[1].2, b.down);
        assert_eq!(
            base.gate.as_ref().unwrap() + d[0].0.as_ref().unwrap(),
            a.gate.unwrap()
        );
    }
}

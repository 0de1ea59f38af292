//! merge_experts — frequency-weighted averaging of (aligned) experts, and neuron permutation.
//!
//! What: `W_G = Σ_{i∈G} f_i · W_i / (Σ_{i∈G} f_i + ε)` for every matrix and bias of a group's
//! experts (docs/algorithm.md §4); uniform averaging when every weight is zero (or asked for).
//! `permute` reorders an expert's intermediate neurons — rows of gate/up (and their biases),
//! columns of down — which leaves its function unchanged; alignment finds the permutation.
//! Preconditions: all members have the same shapes and the same gating.
//! Exactness: merging one expert, or identical experts, returns it unchanged.

use ndarray::{Array1, Array2, Axis};

/// One expert's parameters in canonical orientation (`[out, in]` matrices).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertParams {
    /// Gate projection `[I, H]` (gated FFNs).
    pub gate: Option<Array2<f32>>,
    /// Up projection `[I, H]`.
    pub up: Array2<f32>,
    /// Down projection `[H, I]`.
    pub down: Array2<f32>,
    /// Gate bias `[I]`.
    pub gate_bias: Option<Array1<f32>>,
    /// Up bias `[I]`.
    pub up_bias: Option<Array1<f32>>,
    /// Down bias `[H]`.
    pub down_bias: Option<Array1<f32>>,
}

/// ε of the weighted average's denominator.
const EPS: f64 = 1e-12;

/// The weighted average of `members` (weights `w`, normalised here; uniform when they sum to 0).
pub fn merge_weighted(members: &[&ExpertParams], w: &[f64]) -> ExpertParams {
    assert!(
        !members.is_empty() && members.len() == w.len(),
        "one weight per member"
    );
    let total: f64 = w.iter().sum();
    let coef: Vec<f32> = if total > EPS {
        w.iter().map(|&x| (x / (total + EPS)) as f32).collect()
    } else {
        vec![1.0 / members.len() as f32; members.len()]
    };
    let mat = |get: &dyn Fn(&ExpertParams) -> &Array2<f32>| {
        let mut acc = Array2::<f32>::zeros(get(members[0]).raw_dim());
        for (m, &c) in members.iter().zip(&coef) {
            acc.scaled_add(c, get(m));
        }
        acc
    };
    let vecs = |get: &dyn Fn(&ExpertParams) -> Option<&Array1<f32>>| {
        get(members[0]).map(|first| {
            let mut acc = Array1::<f32>::zeros(first.raw_dim());
            for (m, &c) in members.iter().zip(&coef) {
                acc.scaled_add(c, get(m).expect("same biases in every member"));
            }
            acc
        })
    };
    ExpertParams {
        gate: members[0]
            .gate
            .as_ref()
            .map(|_| mat(&|m| m.gate.as_ref().expect("same gating in every member"))),
        up: mat(&|m| &m.up),
        down: mat(&|m| &m.down),
        gate_bias: vecs(&|m| m.gate_bias.as_ref()),
        up_bias: vecs(&|m| m.up_bias.as_ref()),
        down_bias: vecs(&|m| m.down_bias.as_ref()),
    }
}

/// Reorders intermediate neurons: new neuron `a` is old neuron `perm[a]`. `perm` may also
/// be a subset (the neurons kept by pruning, in order).
pub fn permute(e: &ExpertParams, perm: &[usize]) -> ExpertParams {
    ExpertParams {
        gate: e.gate.as_ref().map(|g| g.select(Axis(0), perm)),
        up: e.up.select(Axis(0), perm),
        down: e.down.select(Axis(1), perm),
        gate_bias: e.gate_bias.as_ref().map(|b| b.select(Axis(0), perm)),
        up_bias: e.up_bias.as_ref().map(|b| b.select(Axis(0), perm)),
        down_bias: e.down_bias.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    fn expert(seed: u64, gated: bool) -> ExpertParams {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        };
        let (h, i) = (4, 6);
        ExpertParams {
            gate: gated.then(|| Array::from_shape_fn((i, h), |_| rnd())),
            up: Array::from_shape_fn((i, h), |_| rnd()),
            down: Array::from_shape_fn((h, i), |_| rnd()),
            gate_bias: gated.then(|| Array::from_shape_fn(i, |_| rnd())),
            up_bias: Some(Array::from_shape_fn(i, |_| rnd())),
            down_bias: Some(Array::from_shape_fn(h, |_| rnd())),
        }
    }

    #[test]
    fn merging_identical_experts_is_exact() {
        let e = expert(1, true);
        let m = merge_weighted(&[&e, &e, &e], &[0.5, 0.2, 0.3]);
        for (a, b) in m.up.iter().zip(e.up.iter()) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0));
        }
        assert_eq!(merge_weighted(&[&e], &[0.7]), e);
    }

    #[test]
    fn weights_are_frequencies_normalised() {
        let (a, b) = (expert(1, false), expert(2, false));
        let m = merge_weighted(&[&a, &b], &[3.0, 1.0]);
        let want = &a.down * 0.75 + &b.down * 0.25;
        assert!(m
            .down
            .iter()
            .zip(want.iter())
            .all(|(x, y)| (x - y).abs() < 1e-6));
        let u = merge_weighted(&[&a, &b], &[0.0, 0.0]);
        let want = (&a.up + &b.up) * 0.5;
        assert!(u
            .up
            .iter()
            .zip(want.iter())
            .all(|(x, y)| (x - y).abs() < 1e-6));
    }

    #[test]
    fn permutation_round_trips() {
        let e = expert(3, true);
        let perm = [2, 0, 5, 1, 4, 3];
        let mut inv = [0usize; 6];
        for (a, &p) in perm.iter().enumerate() {
            inv[p] = a;
        }
        assert_eq!(permute(&permute(&e, &perm), &inv), e);
    }
}

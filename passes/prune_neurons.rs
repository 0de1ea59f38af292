//! prune_neurons — structured pruning of an expert's intermediate neurons.
//!
//! What: score each intermediate neuron j of an expert by its calibrated importance
//! `mean_t |h_tj| · ‖W_down[:, j]‖` (h = the down projection's input on the tokens routed
//! to the expert), keep the `k` best (gate/up rows, their biases and down columns together),
//! in their original order (`merge_experts::permute` with the kept indices slices the
//! expert). The caller refits the kept down columns (`refit_down`): without
//! the refit the error is several times larger.
//! Preconditions: `h` has one column per neuron of `p`.
//! Limits: ties break to the lower index (deterministic); `k` is clamped to `[1, I]`.
//!
//! Before/after: I = 4, scores [0.1, 3, 0.2, 2], k = 2 → neurons [1, 3]: gate/up `[2, H]`,
//! down `[H, 2]`.

use ndarray::ArrayView2;

/// `mean_t |h_tj| · ‖down[:, j]‖` per neuron j (`h` `[rows, I]`, `down` `[H, I]`).
pub fn neuron_scores(h: ArrayView2<f32>, down: ArrayView2<f32>) -> Vec<f64> {
    let rows = h.nrows().max(1) as f64;
    (0..h.ncols())
        .map(|j| {
            let act: f64 = h.column(j).iter().map(|v| f64::from(v.abs())).sum::<f64>() / rows;
            let norm: f64 = down
                .column(j)
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            act * norm
        })
        .collect()
}

/// The `k` highest-scoring neurons, ascending.
pub fn keep_neurons(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep: Vec<usize> = order[..k.clamp(1, scores.len().max(1)).min(scores.len())].to_vec();
    keep.sort_unstable();
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn keeps_the_best_in_order() {
        assert_eq!(keep_neurons(&[0.1, 3.0, 0.2, 2.0], 2), vec![1, 3]);
        assert_eq!(keep_neurons(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
        assert_eq!(keep_neurons(&[1.0, 2.0], 0), vec![1]);
    }

    #[test]
    fn scores_weigh_activation_by_output_norm() {
        let h = array![[1.0f32, -2.0], [3.0, 0.0]];
        let down = array![[3.0f32, 0.0], [4.0, 1.0]];
        let s = neuron_scores(h.view(), down.view());
        assert!((s[0] - 2.0 * 5.0).abs() < 1e-9);
        assert!((s[1] - 1.0 * 1.0).abs() < 1e-9);
    }
}

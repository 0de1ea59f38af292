//! prune_experts — pruning baselines: keep the `m` experts with the highest score and delete
//! the others together with their router rows.
//!
//! What: score = usage frequency (prune-frequency) or REAP saliency, the mean over routed
//! tokens of routing weight × ‖expert output‖ (prune-reap). The kept experts keep their
//! router rows; the dropped rows are removed from the router, so top-k then chooses among
//! the kept experts only (tokens that chose a dropped expert go to their next choice).
//! Preconditions: `top_k ≤ m ≤ N`. Ties: the lower index is kept.
//!
//! Before/after: score [.1, .5, .2, .2], m = 2 → keep [1, 2].

/// Indices of the kept experts, ascending.
pub fn prune_experts(score: &[f64], m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(m.min(score.len())).collect();
    kept.sort_unstable();
    kept
}

#[cfg(test)]
mod tests {
    use super::prune_experts;

    #[test]
    fn keeps_the_highest_scores_lower_index_on_ties() {
        assert_eq!(prune_experts(&[0.1, 0.5, 0.2, 0.2], 2), vec![1, 2]);
        assert_eq!(prune_experts(&[0.1, 0.5, 0.2, 0.2], 4), vec![0, 1, 2, 3]);
        assert_eq!(prune_experts(&[0.3; 4], 1), vec![0]);
    }
}

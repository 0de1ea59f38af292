//! plan_budget — MC-SMoE's adaptive merging ratio: how many groups each MoE layer keeps.
//!
//! What: given each layer's expert usage frequencies and a total number of groups to keep
//! over the merged layers (`g · L_m` for an average of `g` per layer), give every merged layer its own group count `M_l` so that layers with
//! concentrated routing keep few groups and flat layers keep more.
//! How (docs/algorithm.md §2, with the reference's weaknesses fixed): each merged layer's most-used
//! expert counts as frequency 1.0 (every layer keeps at least one group); all (layer, expert)
//! pairs are ranked by frequency and the first
//! `total` pairs are kept (ties: round-robin over layers by rank within the layer, then the
//! earlier layer); `M_l` is the number kept in layer `l`. The total is hit exactly
//! and the result is deterministic on ties (the reference's strict `>` threshold lost groups).
//! Preconditions: every frequency vector is non-empty; `total` ≥ number of layers.
//! Limits: pure function of frequencies; unmerged layers are simply not passed in.
//!
//! Before/after: `[[.7,.1,.1,.1], [.25,.25,.25,.25]]`, total = 4 → `[1, 3]`.

/// Groups to keep per layer (same order as `freqs`), summing to
/// `clamp(total, layers, Σ N_l)`; every layer keeps at least one.
pub fn plan_budget(freqs: &[Vec<f64>], total: usize) -> Vec<usize> {
    let layers = freqs.len();
    let total: usize = total.max(layers).min(freqs.iter().map(Vec::len).sum());
    // (frequency, rank within its layer, layer): ties go round-robin over layers (the
    // i-th most used expert of every layer before the (i+1)-th of any), then earlier layer.
    let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
    for (l, f) in freqs.iter().enumerate() {
        let mut order: Vec<usize> = (0..f.len()).collect();
        order.sort_by(|&a, &b| f[b].total_cmp(&f[a]).then(a.cmp(&b)));
        for (rank, &e) in order.iter().enumerate() {
            let v = if rank == 0 { 1.0 } else { f[e] };
            pairs.push((v, rank, l));
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut m = vec![0usize; layers];
    for &(_, _, l) in pairs.iter().take(total) {
        m[l] += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::plan_budget;

    #[test]
    fn concentrated_layers_keep_fewer_groups() {
        let f = vec![vec![0.7, 0.1, 0.1, 0.1], vec![0.25, 0.25, 0.25, 0.25]];
        assert_eq!(plan_budget(&f, 4), vec![1, 3]);
    }

    #[test]
    fn total_is_exact_even_with_ties() {
        let f = vec![
            vec![0.25; 8],
            vec![0.125; 8],
            vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ];
        for g in 1..=8 {
            let m = plan_budget(&f, 3 * g);
            assert_eq!(m.iter().sum::<usize>(), 3 * g, "g = {g}: {m:?}");
            assert!(m.iter().all(|&x| (1..=8).contains(&x)), "{m:?}");
            assert_eq!(m, plan_budget(&f, 3 * g), "deterministic");
        }
    }

    #[test]
    fn uniform_routing_splits_evenly() {
        let f = vec![vec![0.125; 8]; 2];
        assert_eq!(plan_budget(&f, 8), vec![4, 4]);
        assert_eq!(plan_budget(&f, 7), vec![4, 3]);
    }

    #[test]
    fn full_budget_keeps_everything() {
        let f = vec![vec![0.4, 0.3, 0.2, 0.1]; 3];
        assert_eq!(plan_budget(&f, 12), vec![4, 4, 4]);
        assert_eq!(plan_budget(&f, 27), vec![4, 4, 4]);
    }
}

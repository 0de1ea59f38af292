//! group_experts — M-SMoE grouping: dominant experts seed groups, the others join the
//! dominant expert they are most similar to.
//!
//! What: for one layer with usage frequencies `f` and a similarity matrix `s` (N×N; for the
//! default router-logit basis S = (cos + 1) / 2 of the logit columns), keep the `m` most-used
//! experts as dominant (ties: lower index) and assign every other expert, in decreasing
//! frequency order, to `argmax_{d ∈ dominant} s[j][d]` (ties: lower index).
//! Fix of the reference code's bug (docs/algorithm.md §1): a group is labelled by its dominant
//! expert's own index, not by the dominant's rank.
//! Preconditions: `1 ≤ m ≤ N`; `s` is N×N.
//! Output: for each router expert, the dominant expert (group label) it merges into.
//!
//! Before/after: f = [.4, .1, .3, .2], m = 2, expert 1 most like 2, expert 3 most like 0
//! → labels [0, 2, 2, 0].

/// Group label (the dominant expert's index) of every expert.
pub fn group_experts(f: &[f64], s: &[Vec<f64>], m: usize) -> Vec<usize> {
    let n = f.len();
    let m = m.clamp(1, n.max(1));
    let mut by_freq: Vec<usize> = (0..n).collect();
    by_freq.sort_by(|&a, &b| f[b].total_cmp(&f[a]).then(a.cmp(&b)));
    let dominant: Vec<usize> = by_freq[..m].to_vec();
    let mut label: Vec<usize> = (0..n).collect();
    for &j in &by_freq[m..] {
        let best = dominant
            .iter()
            .copied()
            .max_by(|&a, &b| s[j][a].total_cmp(&s[j][b]).then(b.cmp(&a)))
            .expect("at least one dominant expert");
        label[j] = best;
    }
    label
}

/// The router-logit similarity S = (cos + 1) / 2 from a cosine matrix.
pub fn logit_similarity(cos: &[Vec<f64>]) -> Vec<Vec<f64>> {
    cos.iter()
        .map(|r| r.iter().map(|c| (c + 1.0) / 2.0).collect())
        .collect()
}

/// Expert-weight similarity (cos + 1) / 2 of the experts' concatenated, flattened matrices
/// (the reference code's "weight" basis; unaligned, so it sees neuron order too).
pub fn weight_similarity(experts: &[&super::merge_experts::ExpertParams]) -> Vec<Vec<f64>> {
    let flat: Vec<Vec<f64>> = experts
        .iter()
        .map(|e| {
            let mut v: Vec<f64> = e.up.iter().map(|&x| f64::from(x)).collect();
            if let Some(g) = &e.gate {
                v.extend(g.iter().map(|&x| f64::from(x)));
            }
            v.extend(e.down.iter().map(|&x| f64::from(x)));
            v
        })
        .collect();
    let norm: Vec<f64> = flat
        .iter()
        .map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30))
        .collect();
    (0..flat.len())
        .map(|i| {
            (0..flat.len())
                .map(|j| {
                    let dot: f64 = flat[i].iter().zip(&flat[j]).map(|(a, b)| a * b).sum();
                    (dot / (norm[i] * norm[j]) + 1.0) / 2.0
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{group_experts, logit_similarity};

    #[test]
    fn labels_are_dominant_indices() {
        let f = [0.4, 0.1, 0.3, 0.2];
        let cos = vec![
            vec![1.0, 0.0, 0.1, 0.9],
            vec![0.0, 1.0, 0.8, 0.0],
            vec![0.1, 0.8, 1.0, 0.0],
            vec![0.9, 0.0, 0.0, 1.0],
        ];
        assert_eq!(
            group_experts(&f, &logit_similarity(&cos), 2),
            vec![0, 2, 2, 0]
        );
    }

    #[test]
    fn m_equal_n_keeps_every_expert_alone() {
        let f = [0.1, 0.2, 0.3, 0.4];
        let s = vec![vec![0.5; 4]; 4];
        assert_eq!(group_experts(&f, &s, 4), vec![0, 1, 2, 3]);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let f = [0.3, 0.3, 0.2, 0.2];
        let s = vec![vec![0.5; 4]; 4];
        // Dominant: 0 and 1 (tie on frequency, lower index first); equal similarity -> 0.
        assert_eq!(group_experts(&f, &s, 2), vec![0, 1, 0, 0]);
    }
}

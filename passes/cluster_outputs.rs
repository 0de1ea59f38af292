//! cluster_outputs — HC-SMoE grouping: average-linkage hierarchical clustering of experts by
//! their mean output over all calibration tokens.
//!
//! What: every expert is a point (its mean output `[H]` over every counted token, routed or
//! not, so the statistic is comparable across experts); clusters merge bottom-up, always the
//! pair with the smallest average pairwise Euclidean distance (ties: lowest cluster indices),
//! until `m` clusters remain. Each cluster is labelled by its most-used member (ties: lower
//! index), which then acts as the dominant expert for alignment and merging.
//! Preconditions: `outputs` has N rows; `f` has N entries; `1 ≤ m ≤ N`.
//! Limits: O(N³) time and O(N²) memory — fine for the N ≤ 256 experts of real MoE layers.
//!
//! Before/after: points {0, 0.1, 5, 5.2} (N = 4), m = 2, f = [.1, .4, .3, .2] → labels [1, 1, 2, 2].

use ndarray::ArrayView2;

/// Group label (the index of the cluster's most-used member) of every expert.
pub fn cluster_outputs(outputs: ArrayView2<f64>, f: &[f64], m: usize) -> Vec<usize> {
    let n = outputs.nrows();
    let m = m.clamp(1, n.max(1));
    let d: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    let diff = &outputs.row(i) - &outputs.row(j);
                    diff.dot(&diff).sqrt()
                })
                .collect()
        })
        .collect();
    let mut clusters: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    while clusters.len() > m {
        let mut best = (f64::INFINITY, 0, 0);
        for a in 0..clusters.len() {
            for b in a + 1..clusters.len() {
                let mut s = 0.0;
                for &i in &clusters[a] {
                    for &j in &clusters[b] {
                        s += d[i][j];
                    }
                }
                let avg = s / (clusters[a].len() * clusters[b].len()) as f64;
                if avg < best.0 {
                    best = (avg, a, b);
                }
            }
        }
        let (_, a, b) = best;
        let moved = clusters.remove(b);
        clusters[a].extend(moved);
    }
    let mut label = vec![0; n];
    for c in &clusters {
        let rep = c
            .iter()
            .copied()
            .max_by(|&x, &y| f[x].total_cmp(&f[y]).then(y.cmp(&x)))
            .expect("clusters are never empty");
        for &i in c {
            label[i] = rep;
        }
    }
    label
}

#[cfg(test)]
mod tests {
    use super::cluster_outputs;
    use ndarray::{array, Array2};

    #[test]
    fn nearby_outputs_cluster_and_the_most_used_member_labels() {
        let x = array![[0.0], [0.1], [5.0], [5.2]];
        assert_eq!(
            cluster_outputs(x.view(), &[0.1, 0.4, 0.3, 0.2], 2),
            vec![1, 1, 2, 2]
        );
    }

    #[test]
    fn average_linkage_not_single_linkage() {
        // After {3,4} and {0,1} form, point 2 is nearer {0,1} by single linkage (1.05 < 1.15)
        // but nearer {3,4} by average linkage (1.50 < 1.55).
        let x = array![[0.0], [1.0], [2.05], [3.2], [3.9]];
        let l = cluster_outputs(x.view(), &[0.2; 5], 2);
        assert_eq!(l, vec![0, 0, 2, 2, 2]);
    }

    #[test]
    fn m_equal_n_is_identity() {
        let x = Array2::from_shape_fn((6, 3), |(i, j)| (i * 3 + j) as f64);
        assert_eq!(
            cluster_outputs(x.view(), &[0.1; 6], 6),
            (0..6).collect::<Vec<_>>()
        );
    }
}

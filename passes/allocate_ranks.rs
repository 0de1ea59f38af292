//! allocate_ranks — one global greedy allocation of ranks over many matrices under an
//! element budget.
//!
//! What: every matrix `m` (`out × in`) comes with the energies `g_m,i` its terms carry (for a
//! whitened SVD, σ²_i of `Lᵀ·Wᵀ`: the squared output error that dropping term i adds), and a
//! weight `c_m` that normalises them (the layer's total energy of the matrix's type: gate, up
//! or down; raw energies mix pre-activation and output units). Starting from rank 0
//! everywhere, a max-heap takes steps by gain per element: one more rank (gain `c_m·g_m,r`,
//! cost `in + out`) or, for a matrix whose next ranks no longer save bytes, the jump to dense
//! (gain = its remaining energy, cost = `in·out − r·(in + out)`); steps are taken while they
//! fit the budget. A rank at or above `⌊in·out/(in+out)⌋` never saves bytes: such a matrix
//! stays dense.
//! Preconditions: energies non-increasing per matrix (SVD order).
//! Limits: greedy (exact for concave cumulative energies, which SVD spectra are); ties break
//! to the lower matrix index, so the result is deterministic.
//!
//! Before/after: two 8×8 matrices with energies [9, 1, 0, 0] and [4, 4, 0, 0], budget 48
//! elements (3 ranks of 16) → ranks [1, 2].

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One matrix to allocate for.
#[derive(Debug, Clone)]
pub struct MatrixEnergies {
    /// Rows (output features).
    pub out: usize,
    /// Columns (input features).
    pub inp: usize,
    /// Energy of each term, non-increasing.
    pub energy: Vec<f64>,
    /// Normalising weight applied to every energy.
    pub weight: f64,
}

/// The decision for one matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rank {
    /// Factor at this rank (0 drops the matrix).
    Factor(usize),
    /// Store dense.
    Dense,
}

impl MatrixEnergies {
    /// The highest rank that still saves elements over dense.
    pub fn max_rank(&self) -> usize {
        let r = (self.out * self.inp) / (self.out + self.inp).max(1);
        // Strictly cheaper than dense.
        let r = if r * (self.out + self.inp) >= self.out * self.inp {
            r.saturating_sub(1)
        } else {
            r
        };
        r.min(self.energy.len())
    }

    /// Elements stored at `rank`.
    pub fn cost(&self, rank: Rank) -> usize {
        match rank {
            Rank::Factor(r) => r * (self.out + self.inp),
            Rank::Dense => self.out * self.inp,
        }
    }

    /// Weighted energy lost at `rank`.
    pub fn loss(&self, rank: Rank) -> f64 {
        match rank {
            Rank::Factor(r) => {
                self.weight * self.energy[r.min(self.energy.len())..].iter().sum::<f64>()
            }
            Rank::Dense => 0.0,
        }
    }
}

struct Step {
    ratio: f64,
    matrix: usize,
    to: Rank,
}

impl PartialEq for Step {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Step {}
impl PartialOrd for Step {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Step {
    fn cmp(&self, o: &Self) -> Ordering {
        self.ratio
            .total_cmp(&o.ratio)
            .then(o.matrix.cmp(&self.matrix))
    }
}

/// The best next step of matrix `m` at `rank` (None when dense).
fn next_step(m: &MatrixEnergies, idx: usize, rank: Rank) -> Option<Step> {
    let Rank::Factor(r) = rank else { return None };
    let here = m.cost(rank);
    let mut best: Option<Step> = None;
    if r < m.max_rank() {
        let gain = m.weight * m.energy[r];
        best = Some(Step {
            ratio: gain / (m.out + m.inp) as f64,
            matrix: idx,
            to: Rank::Factor(r + 1),
        });
    }
    let dense_cost = m.cost(Rank::Dense).saturating_sub(here).max(1);
    let dense = Step {
        ratio: m.loss(rank) / dense_cost as f64,
        matrix: idx,
        to: Rank::Dense,
    };
    // Going dense is offered when no factor step is left, or when it is the better deal.
    match best {
        Some(b) if b.ratio >= dense.ratio => Some(b),
        _ => Some(dense),
    }
}

/// Ranks for `mats` storing at most `budget` elements in total (every matrix at rank 0
/// stores nothing). Returns one decision per matrix and the elements used.
pub fn allocate_ranks(mats: &[MatrixEnergies], budget: usize) -> (Vec<Rank>, usize) {
    let mut ranks = vec![Rank::Factor(0); mats.len()];
    let mut used = 0usize;
    let mut heap: BinaryHeap<Step> = mats
        .iter()
        .enumerate()
        .filter_map(|(i, m)| next_step(m, i, Rank::Factor(0)))
        .collect();
    while let Some(step) = heap.pop() {
        let m = &mats[step.matrix];
        let delta = m.cost(step.to) - m.cost(ranks[step.matrix]);
        if used + delta > budget {
            // Try the other kind of step of this matrix (a rank is cheaper than dense).
            if step.to == Rank::Dense {
                if let Rank::Factor(r) = ranks[step.matrix] {
                    if r < m.max_rank() && used + m.out + m.inp <= budget {
                        heap.push(Step {
                            ratio: m.weight * m.energy[r] / (m.out + m.inp) as f64,
                            matrix: step.matrix,
                            to: Rank::Factor(r + 1),
                        });
                    }
                }
            }
            continue;
        }
        used += delta;
        ranks[step.matrix] = step.to;
        if let Some(s) = next_step(m, step.matrix, step.to) {
            heap.push(s);
        }
    }
    (ranks, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(energy: Vec<f64>) -> MatrixEnergies {
        MatrixEnergies {
            out: 8,
            inp: 8,
            energy,
            weight: 1.0,
        }
    }

    #[test]
    fn greedy_takes_the_largest_energies_first() {
        let mats = [m(vec![9.0, 1.0, 0.0, 0.0]), m(vec![4.0, 4.0, 0.0, 0.0])];
        let (r, used) = allocate_ranks(&mats, 48);
        assert_eq!(r, vec![Rank::Factor(1), Rank::Factor(2)]);
        assert_eq!(used, 48);
    }

    #[test]
    fn full_budget_is_dense_everywhere() {
        let mats = [m(vec![9.0, 1.0, 0.5, 0.1]), m(vec![4.0, 4.0, 3.0, 0.2])];
        let (r, used) = allocate_ranks(&mats, 128);
        assert_eq!(r, vec![Rank::Dense, Rank::Dense]);
        assert_eq!(used, 128);
    }

    #[test]
    fn never_exceeds_the_budget() {
        let mats: Vec<MatrixEnergies> = (0..5)
            .map(|i| MatrixEnergies {
                out: 6 + i,
                inp: 10,
                energy: (0..6).map(|k| 1.0 / (1 + k + i) as f64).collect(),
                weight: 1.0 + i as f64,
            })
            .collect();
        for budget in [0, 7, 33, 100, 250, 400] {
            let (r, used) = allocate_ranks(&mats, budget);
            let real: usize = r.iter().zip(&mats).map(|(&r, m)| m.cost(r)).sum();
            assert_eq!(real, used);
            assert!(used <= budget, "{used} > {budget}");
        }
    }

    #[test]
    fn max_rank_saves_elements() {
        let a = MatrixEnergies {
            out: 4,
            inp: 4,
            energy: vec![1.0; 4],
            weight: 1.0,
        };
        // 2·8 = 16 = dense: not a saving, so 1.
        assert_eq!(a.max_rank(), 1);
        let b = MatrixEnergies {
            out: 96,
            inp: 192,
            energy: vec![1.0; 96],
            weight: 1.0,
        };
        assert_eq!(b.max_rank(), 63);
    }
}

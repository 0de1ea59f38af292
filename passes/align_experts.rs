//! align_experts — permutation alignment of one expert's intermediate neurons to a reference
//! expert (docs/algorithm.md §3), so that averaging the two is meaningful.
//!
//! What: an FFN's function does not change when its intermediate neurons are permuted (rows of
//! gate/up and their biases, columns of down, together). Two experts trained from different
//! starts compute similar features in different neuron orders; averaging them unaligned mixes
//! unrelated neurons. This pass finds the permutation π of the target's neurons that best matches
//! the reference's and applies it.
//! How:
//! - weight matching: similarity `C = U_r U_tᵀ + G_r G_tᵀ + D_rᵀ D_t (+ b_r b_tᵀ per bias)`
//!   (I×I); for gated (SwiGLU/GeGLU) experts the gate, up and down terms move together — the
//!   reference code never aligned gated experts;
//! - activation matching: Pearson correlation of the two experts' intermediate activations on the
//!   same calibration inputs (tokens routed to either);
//! - then the exact linear sum assignment maximising Σ C[a, π(a)] (shortest augmenting
//!   paths with dual potentials, the Jonker–Volgenant family; faster than the `lapjv` crate
//!   and than scipy on these matrices, see BENCHMARKS.md).
//!
//! Preconditions: both experts have the same shapes and gating. Limits: cost O(I²·H) to build,
//! O(I³) worst case to solve; the similarity products use every core (faer), the assignment
//! one (callers run pairs in parallel where their matrices fit in memory).
//! Before/after: a target that is an exact neuron-permuted copy of the reference aligns to
//! distance 0.

use super::merge_experts::{permute, ExpertParams};
use ndarray::{Array2, ArrayView2, Axis};

/// Weight-matching similarity `[I, I]`: entry (a, b) compares reference neuron a with target
/// neuron b through every matrix (and bias) that touches the neuron.
///
/// The three products run in float32 through faer on every core of the current rayon pool,
/// one block of [`COST_BLOCK`] reference neurons at a time, each block widened into the f64
/// result as it is done: the I×I matrix is held once, in f64 (I = 14336: 1.6 GB, plus a
/// 117 MB block).
pub fn weight_cost(r: &ExpertParams, t: &ExpertParams) -> Array2<f64> {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef, Par};
    use rayon::prelude::*;
    let n = r.up.nrows();
    // Views in row-major order (copies only of a matrix that is not already).
    fn std(a: &Array2<f32>) -> ndarray::CowArray<'_, f32, ndarray::Ix2> {
        a.as_standard_layout()
    }
    let (ru, tu, rd, td) = (std(&r.up), std(&t.up), std(&r.down), std(&t.down));
    let gates = match (&r.gate, &t.gate) {
        (Some(a), Some(b)) => Some((std(a), std(b))),
        _ => None,
    };
    fn rows<'a>(a: &'a ndarray::CowArray<'_, f32, ndarray::Ix2>) -> MatRef<'a, f32> {
        MatRef::from_row_major_slice(a.as_slice().expect("standard layout"), a.nrows(), a.ncols())
    }
    let mut c = Array2::<f64>::zeros((n, n));
    let mut buf = vec![0f32; COST_BLOCK.min(n.max(1)) * n];
    // Each thread takes an equal share of the block's rows, sequentially: measured faster
    // than faer's own parallel split of the same product here (128 vs 107 GFLOP/s on two
    // cores, 8 × 4096 × 14336 layer).
    let threads = rayon::current_num_threads().max(1);
    for a0 in (0..n).step_by(COST_BLOCK) {
        let m = COST_BLOCK.min(n - a0);
        let share = m.div_ceil(threads);
        buf[..m * n]
            .par_chunks_mut(share * n)
            .enumerate()
            .for_each(|(p, out)| {
                let (r0, rows_here) = (a0 + p * share, out.len() / n);
                let mut blk = MatMut::from_row_major_slice_mut(out, rows_here, n);
                // Rows r0.. of G_r·G_tᵀ + U_r·U_tᵀ + D_rᵀ·D_t.
                let mut terms: Vec<(MatRef<f32>, MatRef<f32>)> = Vec::with_capacity(3);
                if let Some((g, h)) = &gates {
                    terms.push((rows(g).subrows(r0, rows_here), rows(h).transpose()));
                }
                terms.push((rows(&ru).subrows(r0, rows_here), rows(&tu).transpose()));
                terms.push((rows(&rd).transpose().subrows(r0, rows_here), rows(&td)));
                for (k, (x, y)) in terms.into_iter().enumerate() {
                    let accum = if k == 0 { Accum::Replace } else { Accum::Add };
                    matmul(blk.as_mut(), accum, x, y, 1.0f32, Par::Seq);
                }
            });
        c.as_slice_mut().expect("a fresh array is contiguous")[a0 * n..(a0 + m) * n]
            .par_chunks_mut(n)
            .zip(buf[..m * n].par_chunks(n))
            .for_each(|(out, src)| {
                for (o, &v) in out.iter_mut().zip(src) {
                    *o = f64::from(v);
                }
            });
    }
    for (br, bt) in [(&r.up_bias, &t.up_bias), (&r.gate_bias, &t.gate_bias)] {
        if let (Some(br), Some(bt)) = (br, bt) {
            for (a, &x) in br.iter().enumerate() {
                for (b, &y) in bt.iter().enumerate() {
                    c[[a, b]] += f64::from(x) * f64::from(y);
                }
            }
        }
    }
    c
}

/// Reference neurons per block of [`weight_cost`]'s products.
pub const COST_BLOCK: usize = 2048;

/// Activation-matching similarity `[I, I]`: Pearson correlation between the reference's
/// neuron a and the target's neuron b over the same rows (`[rows, I]` each). Constant
/// neurons correlate 0 with everything.
pub fn activation_cost(hr: ArrayView2<f32>, ht: ArrayView2<f32>) -> Array2<f64> {
    let z = |h: ArrayView2<f32>| {
        // Row-major whatever `h`'s layout (faer reads it as a row-major slice below).
        let mut h = Array2::from_shape_fn(h.dim(), |(i, j)| f64::from(h[[i, j]]));
        for mut col in h.axis_iter_mut(Axis(1)) {
            let mean = col.mean().unwrap_or(0.0);
            col.mapv_inplace(|v| v - mean);
            let norm = col.dot(&col).sqrt();
            if norm > 1e-12 {
                col.mapv_inplace(|v| v / norm);
            } else {
                col.fill(0.0);
            }
        }
        h
    };
    let (zr, zt) = (z(hr), z(ht));
    fn view(a: &Array2<f64>) -> faer::MatRef<'_, f64> {
        faer::MatRef::from_row_major_slice(
            a.as_slice().expect("built row-major"),
            a.nrows(),
            a.ncols(),
        )
    }
    let (zr, zt) = (view(&zr), view(&zt));
    let (n, m) = (zr.ncols(), zt.ncols());
    let mut c = Array2::<f64>::zeros((n, m));
    let out = faer::MatMut::from_row_major_slice_mut(
        c.as_slice_mut().expect("a fresh array is contiguous"),
        n,
        m,
    );
    faer::linalg::matmul::matmul(
        out,
        faer::Accum::Replace,
        zr.transpose(),
        zt,
        1.0,
        faer::Par::rayon(0),
    );
    c
}

/// The exact assignment maximising `Σ_a c[a, perm[a]]` for a square similarity matrix.
/// Errors on non-square or non-finite input.
pub fn solve_max(c: &Array2<f64>) -> Result<Vec<usize>, String> {
    let (n, m) = c.dim();
    if n != m {
        return Err(format!("assignment matrix is {n}x{m}, not square"));
    }
    if c.iter().any(|v| !v.is_finite()) {
        return Err("assignment matrix has non-finite entries".into());
    }
    let c = c.as_standard_layout();
    let data = c.as_slice().expect("standard layout");
    Ok(shortest_augmenting_path(data, n))
}

/// Exact maximum-similarity assignment of an n×n row-major matrix `s`: minimum cost with
/// cost = −s (negated on the fly, no copy), by successive shortest augmenting paths with dual
/// potentials (Jonker–Volgenant family; Crouse, IEEE TAES 2016): one Dijkstra-like search
/// per row over reduced costs `cost[i][j] − u[i] − v[j] ≥ 0`. O(n³) worst case; returns
/// `col[row]`.
fn shortest_augmenting_path(c: &[f64], n: usize) -> Vec<usize> {
    const NONE: usize = usize::MAX;
    let mut u = vec![0f64; n];
    let mut v = vec![0f64; n];
    let mut col4row = vec![NONE; n];
    let mut row4col = vec![NONE; n];
    let mut path = vec![NONE; n];
    let mut dist = vec![f64::INFINITY; n];
    let mut in_rows = vec![false; n];
    let mut in_cols = vec![false; n];
    let mut remaining: Vec<usize> = Vec::with_capacity(n);
    let mut visited_rows: Vec<usize> = Vec::with_capacity(n);
    for cur in 0..n {
        remaining.clear();
        remaining.extend((0..n).rev());
        dist.fill(f64::INFINITY);
        for &r in &visited_rows {
            in_rows[r] = false;
        }
        visited_rows.clear();
        in_cols.fill(false);
        let mut min_val = 0f64;
        let mut i = cur;
        let sink = loop {
            in_rows[i] = true;
            visited_rows.push(i);
            let row = &c[i * n..(i + 1) * n];
            let ui = u[i];
            let mut lowest = f64::INFINITY;
            let mut best = 0usize;
            for (it, &j) in remaining.iter().enumerate() {
                let r = min_val - row[j] - ui - v[j];
                if r < dist[j] {
                    path[j] = i;
                    dist[j] = r;
                }
                if dist[j] < lowest || (dist[j] == lowest && row4col[j] == NONE) {
                    lowest = dist[j];
                    best = it;
                }
            }
            min_val = lowest;
            let j = remaining.swap_remove(best);
            in_cols[j] = true;
            if row4col[j] == NONE {
                break j;
            }
            i = row4col[j];
        };
        // Dual update.
        u[cur] += min_val;
        for &r in &visited_rows {
            if r != cur {
                u[r] += min_val - dist[col4row[r]];
            }
        }
        for j in 0..n {
            if in_cols[j] {
                v[j] -= min_val - dist[j];
            }
        }
        // Augment along the path back to `cur`.
        let mut j = sink;
        loop {
            let i = path[j];
            row4col[j] = i;
            let prev = col4row[i];
            col4row[i] = j;
            if i == cur {
                break;
            }
            j = prev;
        }
    }
    col4row
}

/// Frobenius distance between two experts over every matrix and bias.
pub fn distance(a: &ExpertParams, b: &ExpertParams) -> f64 {
    fn sq<'x, I: Iterator<Item = (&'x f32, &'x f32)>>(it: I) -> f64 {
        it.map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
            .sum()
    }
    let mut s = sq(a.up.iter().zip(b.up.iter())) + sq(a.down.iter().zip(b.down.iter()));
    if let (Some(x), Some(y)) = (&a.gate, &b.gate) {
        s += sq(x.iter().zip(y.iter()));
    }
    for (x, y) in [
        (&a.up_bias, &b.up_bias),
        (&a.gate_bias, &b.gate_bias),
        (&a.down_bias, &b.down_bias),
    ] {
        if let (Some(x), Some(y)) = (x, y) {
            s += sq(x.iter().zip(y.iter()));
        }
    }
    s.sqrt()
}

/// A target aligned to its reference.
#[derive(Debug, Clone)]
pub struct Aligned {
    /// The permuted target.
    pub params: ExpertParams,
    /// New neuron a is old neuron `perm[a]`.
    pub perm: Vec<usize>,
    /// Weight distance to the reference before alignment.
    pub before: f64,
    /// Weight distance to the reference after alignment.
    pub after: f64,
}

/// Aligns `t` to `r` with the permutation that maximises `similarity`.
pub fn align(
    r: &ExpertParams,
    t: &ExpertParams,
    similarity: &Array2<f64>,
) -> Result<Aligned, String> {
    let perm = solve_max(similarity)?;
    let params = permute(t, &perm);
    Ok(Aligned {
        before: distance(r, t),
        after: distance(r, &params),
        params,
        perm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, Array1};

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % 20001) as f32 / 10000.0 - 1.0
        }
        fn perm(&mut self, n: usize) -> Vec<usize> {
            let mut p: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = (self.0 % (i as u64 + 1)) as usize;
                self.f();
                p.swap(i, j);
            }
            p
        }
    }

    fn expert(rng: &mut Rng, h: usize, i: usize, gated: bool) -> ExpertParams {
        ExpertParams {
            gate: gated.then(|| Array::from_shape_fn((i, h), |_| rng.f())),
            up: Array::from_shape_fn((i, h), |_| rng.f()),
            down: Array::from_shape_fn((h, i), |_| rng.f()),
            gate_bias: None,
            up_bias: Some(Array1::from_shape_fn(i, |_| rng.f())),
            down_bias: Some(Array1::from_shape_fn(h, |_| rng.f())),
        }
    }

    fn noisy(e: &ExpertParams, rng: &mut Rng, s: f32) -> ExpertParams {
        let mut e = e.clone();
        e.up.mapv_inplace(|v| v + s * rng.f());
        e.down.mapv_inplace(|v| v + s * rng.f());
        if let Some(g) = &mut e.gate {
            g.mapv_inplace(|v| v + s * rng.f());
        }
        e
    }

    #[test]
    fn weight_matching_recovers_planted_permutations() {
        let mut rng = Rng(7);
        for gated in [false, true] {
            let r = expert(&mut rng, 16, 48, gated);
            let p = rng.perm(48);
            let t = noisy(&permute(&r, &p), &mut rng, 0.05);
            let a = align(&r, &t, &weight_cost(&r, &t)).unwrap();
            // permute(r, p)[a] = r[p[a]] -> aligning back needs the inverse.
            let mut inv = vec![0; 48];
            for (k, &x) in p.iter().enumerate() {
                inv[x] = k;
            }
            assert_eq!(a.perm, inv, "gated={gated}");
            assert!(a.after < 0.2 * a.before, "{} vs {}", a.after, a.before);
        }
    }

    #[test]
    fn activation_matching_recovers_planted_permutations() {
        let mut rng = Rng(11);
        let hr = Array::from_shape_fn((200, 24), |_| rng.f());
        let p = rng.perm(24);
        let ht = hr.select(Axis(1), &p).mapv(|v| 2.0 * v + 0.01 * rng.f());
        let c = activation_cost(hr.view(), ht.view());
        let perm = solve_max(&c).unwrap();
        for (a, &b) in perm.iter().enumerate() {
            assert_eq!(p[b], a);
        }
    }

    #[test]
    fn solver_is_exact_against_brute_force() {
        let mut rng = Rng(3);
        fn perms(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut out = vec![];
            for p in perms(n - 1) {
                for k in 0..n {
                    let mut q = p.clone();
                    q.insert(k, n - 1);
                    out.push(q);
                }
            }
            out
        }
        for n in 1..=7 {
            let all = perms(n);
            for _ in 0..20 {
                let c = Array2::from_shape_fn((n, n), |_| f64::from(rng.f()));
                let best = all
                    .iter()
                    .map(|p| p.iter().enumerate().map(|(a, &b)| c[[a, b]]).sum::<f64>())
                    .fold(f64::MIN, f64::max);
                let got: f64 = solve_max(&c)
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(a, &b)| c[[a, b]])
                    .sum();
                assert!((got - best).abs() < 1e-9, "n={n}: {got} vs {best}");
            }
        }
    }

    #[test]
    fn bad_matrices_are_errors() {
        assert!(solve_max(&Array2::zeros((2, 3))).is_err());
        assert!(solve_max(&Array2::from_elem((2, 2), f64::NAN)).is_err());
        assert_eq!(
            solve_max(&Array2::zeros((0, 0))).unwrap(),
            Vec::<usize>::new()
        );
    }
}

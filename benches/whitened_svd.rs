//! Timing of the compression linear algebra on one MoE layer of random experts: per expert,
//! the input Grams, Cholesky whitening and the activation-aware SVDs of gate, up and down
//! (what `--compress low-rank` computes), experts in parallel. benches/whitened_svd_numpy.py
//! does the same in numpy for comparison.
//!
//!     cargo bench --bench whitened_svd -- H I EXPERTS ROWS
//!
//! Prints `seconds`.
use ndarray::Array2;
use rayon::prelude::*;
use smoe_opt::linalg::{gram, WhitenedSvd};
use std::time::Instant;

fn rnd(seed: u64, r: usize, c: usize) -> Array2<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    Array2::from_shape_fn((r, c), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % 20001) as f32 / 10000.0 - 1.0
    })
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (h, i, e, rows) = match args.as_slice() {
        [h, i, e, r, ..] => (*h, *i, *e, *r),
        _ => (1024, 3584, 4, 4096),
    };
    let experts: Vec<_> = (0..e as u64)
        .map(|k| (rnd(k, i, h), rnd(k + 100, i, h), rnd(k + 200, h, i)))
        .collect();
    let xs: Vec<_> = (0..e as u64).map(|k| rnd(k + 300, rows, h)).collect();
    let hs: Vec<_> = (0..e as u64).map(|k| rnd(k + 400, rows, i)).collect();
    let t = Instant::now();
    let total: usize = experts
        .par_iter()
        .zip(&xs)
        .zip(&hs)
        .map(|(((g, u, d), x), hh)| {
            let gx = gram(x.view(), None);
            let gh = gram(hh.view(), None);
            let a = WhitenedSvd::new(g.view(), gx.as_ref(), 1e-3);
            let b = WhitenedSvd::new(u.view(), gx.as_ref(), 1e-3);
            let c = WhitenedSvd::new(d.view(), gh.as_ref(), 1e-3);
            a.sigma.len() + b.sigma.len() + c.sigma.len()
        })
        .sum();
    println!("{:.3} ({total} singular values)", t.elapsed().as_secs_f64());
}

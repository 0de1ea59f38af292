//! Timing of the merge plan's weight-matching work on one MoE layer saved by
//! benches/align_numpy.py (which times the same algorithm in numpy/scipy on the same arrays):
//! for every pair (dominant 2k, member 2k+1) the I×I similarity, the exact assignment, the
//! permutation and distances, then the frequency-weighted merge of the pair.
//!
//!     cargo bench --bench align -- DIR      (reads DIR/e{k}_{gate,up,down}.npy)
//!
//! Prints one line per pair, `pair similarity_s assign_s permute_s merge_s objective`, then
//! `total SECONDS`.
use ndarray::Array2;
use smoe_opt::passes::align_experts::{distance, solve_max, weight_cost};
use smoe_opt::passes::merge_experts::{merge_weighted, permute, ExpertParams};
use std::path::Path;
use std::time::Instant;

fn load(dir: &Path, k: usize) -> ExpertParams {
    let read = |m: &str| -> Array2<f32> {
        let p = dir.join(format!("e{k}_{m}.npy"));
        ndarray_npy::read_npy(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (run benches/align_numpy.py)", p.display()))
    };
    ExpertParams {
        gate: Some(read("gate")),
        up: read("up"),
        down: read("down"),
        gate_bias: None,
        up_bias: None,
        down_bias: None,
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to measure.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "/tmp/smoe-align".into());
    let dir = Path::new(&dir);
    let mut k = 0;
    let start = Instant::now();
    let mut work = 0.0;
    while dir.join(format!("e{}_up.npy", k + 1)).exists() {
        let (r, t) = (load(dir, k), load(dir, k + 1));
        let t0 = Instant::now();
        let c = weight_cost(&r, &t);
        let t1 = Instant::now();
        let perm = solve_max(&c).expect("solvable");
        let t2 = Instant::now();
        let obj: f64 = perm.iter().enumerate().map(|(a, &b)| c[[a, b]]).sum();
        drop(c);
        // What `align` does after solving: permute, and the distances before and after.
        let aligned = permute(&t, &perm);
        std::hint::black_box((distance(&r, &t), distance(&r, &aligned)));
        let t3 = Instant::now();
        let merged = merge_weighted(&[&r, &aligned], &[0.6, 0.4]);
        let t4 = Instant::now();
        std::hint::black_box(merged);
        let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
        println!(
            "{} {:.3} {:.3} {:.3} {:.3} {obj:.6}",
            k / 2,
            s(t0, t1),
            s(t1, t2),
            s(t2, t3),
            s(t3, t4)
        );
        work += s(t0, t4);
        k += 2;
    }
    assert!(k > 0, "{}: no expert pairs", dir.display());
    println!(
        "total {work:.3} (wall with loading {:.3})",
        start.elapsed().as_secs_f64()
    );
}

//! Exact linear sum assignment timing on saved cost matrices (used by
//! benches/lsa_vs_scipy.py, which makes the matrices and times scipy on the same ones).
//!
//!     cargo bench --bench lsa -- DIR      (reads DIR/cost_*.npy, maximises)
//!
//! Prints one line per matrix: `size seconds objective`.
use smoe_opt::passes::align_experts::solve_max;
use std::time::Instant;

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to measure.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "/tmp/smoe-lsa".into());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e} (run benches/lsa_vs_scipy.py)"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "npy"))
        .collect();
    files.sort();
    for f in files {
        let c: ndarray::Array2<f64> = ndarray_npy::read_npy(&f).expect("a 2-D float64 .npy");
        let t = Instant::now();
        let perm = solve_max(&c).expect("solvable");
        let secs = t.elapsed().as_secs_f64();
        let obj: f64 = perm.iter().enumerate().map(|(a, &b)| c[[a, b]]).sum();
        println!("{} {secs:.4} {obj:.6}", c.nrows());
    }
}

//! A short mutation-fuzzing run (tests/common/fuzz.rs): the loader, detector, inspection,
//! re-emission, npz reader and statistics loader never panic on mutated committed files.
//! `cargo bench --bench fuzz` runs a long one.
mod common;
#[path = "common/fuzz.rs"]
mod fuzz;

#[test]
fn mutated_models_npz_and_statistics_never_panic() {
    let iters = std::env::var("SMOE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let o = fuzz::run(&common::root(), iters, 1);
    eprintln!(
        "fuzz: {} executions, {} accepted, {} crashes",
        o.executions,
        o.accepted,
        o.crashes.len()
    );
    assert!(
        o.crashes.is_empty(),
        "{} crashes: {:?}",
        o.crashes.len(),
        o.crashes
    );
    // Some mutations must get through the decoder, or the run tests nothing deeper.
    assert!(o.accepted > 0, "{o:?}");
}

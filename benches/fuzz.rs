//! Long mutation-fuzzing run (tests/common/fuzz.rs): `cargo bench --bench fuzz -- [ITERS] [SEED]`.
//! Prints a table of executions, inputs accepted, crashes and time.
#[path = "../tests/common/fuzz.rs"]
mod fuzz;

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: the short run is
    // tests/fuzz.rs.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let iters: usize = args.first().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(7);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let t = std::time::Instant::now();
    let o = fuzz::run(root, iters, seed);
    let secs = t.elapsed().as_secs_f64();
    println!("| targets | executions | accepted | crashes | seconds | seed |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| model load + detect + inspect + re-emit, npz, statistics | {} | {} | {} | {secs:.1} | {seed} |",
        o.executions,
        o.accepted,
        o.crashes.len()
    );
    for c in o.crashes.iter().take(20) {
        println!("crash: {c}");
    }
    if !o.crashes.is_empty() {
        std::process::exit(1);
    }
}

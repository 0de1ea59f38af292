//! A mutation fuzzer on stable Rust (no cargo-fuzz): committed test files are mutated (bit
//! flips, overwritten and inserted random bytes, duplicated chunks, truncation) with a seeded
//! generator and fed to the ONNX loader + MoE detector + inspection + exact re-emission, to the
//! npz reader, and to the statistics loader. Any panic is a failure; errors are the expected
//! outcome. Used by `tests/fuzz.rs` (a short run) and `benches/fuzz.rs` (a long run that prints
//! executions, crashes and time).
use prost::Message;
use std::path::{Path, PathBuf};

/// xorshift64*: deterministic, seeded.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `b`.
pub fn mutate(b: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = b.to_vec();
    if v.is_empty() {
        return vec![rng.next() as u8];
    }
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(v.len());
        match rng.below(6) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => {
                let n = (1 + rng.below(16)).min(v.len() - at);
                for x in &mut v[at..at + n] {
                    *x = rng.next() as u8;
                }
            }
            2 => v.truncate(at.max(1)),
            3 => {
                let n = 1 + rng.below(8);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, ins);
            }
            4 => {
                let n = (1 + rng.below(64)).min(v.len() - at);
                let chunk = v[at..at + n].to_vec();
                let to = rng.below(v.len());
                v.splice(to..to, chunk);
            }
            _ => v[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)],
        }
        if v.is_empty() {
            v.push(0);
        }
    }
    v
}

/// What a run found.
#[derive(Default, Debug)]
pub struct Outcome {
    /// Inputs tried.
    pub executions: usize,
    /// Inputs that were accepted (loaded without error).
    pub accepted: usize,
    /// Panics: target and message.
    pub crashes: Vec<String>,
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Loads, detects, inspects and re-emits one model given as bytes; Ok(true) when it loaded.
fn model_target(bytes: &[u8], dir: &Path) -> bool {
    let Ok(proto) = smoe_opt::onnx::proto::ModelProto::decode(bytes) else {
        return false;
    };
    let Ok(model) = smoe_opt::Model::from_proto(proto, dir, None) else {
        return false;
    };
    let det = smoe_opt::moe::detect(&model.graph);
    let _ = smoe_opt::inspect::inspect(&model).to_text();
    let mut m = model.clone();
    let _ = smoe_opt::emit::reemit(&mut m, &det, smoe_opt::emit::EmitForm::Portable);
    true
}

/// Runs `iters` mutations of each seed file through every target.
pub fn run(root: &Path, iters: usize, seed: u64) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let models: Vec<PathBuf> = [
        "testdata/variants/mixtral_n4_k1/model.onnx",
        "testdata/variants/biased_swiglu_n8_k2/model.onnx",
        "testdata/variants/sigmoid_router_n8_k2/model.onnx",
        "testdata/models/ort_moe_swiglu/model.onnx",
    ]
    .iter()
    .map(|p| root.join(p))
    .filter(|p| p.exists())
    .collect();
    let npz = root.join("testdata/variants/mixtral_n4_k1/io.npz");
    let npz_bytes = std::fs::read(&npz).unwrap();
    // Statistics to mutate: calibrate the first model once.
    let stats = tmp.path().join("s.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_smoe-opt"))
        .arg("calibrate")
        .arg(&models[0])
        .arg("--calib")
        .arg(&npz)
        .arg("-o")
        .arg(&stats)
        .arg("-q")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats_json = std::fs::read(&stats).unwrap();
    let stats_npz = std::fs::read(stats.with_extension("npz")).unwrap();
    let seeds: Vec<Vec<u8>> = models.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..iters {
        // Models.
        let src = &seeds[i % seeds.len()];
        let m = mutate(src, &mut rng);
        out.executions += 1;
        match std::panic::catch_unwind(|| model_target(&m, tmp.path())) {
            Ok(true) => out.accepted += 1,
            Ok(false) => {}
            Err(p) => out.crashes.push(format!("model: {}", panic_text(p))),
        }
        // npz.
        let f = tmp.path().join("x.npz");
        std::fs::write(&f, mutate(&npz_bytes, &mut rng)).unwrap();
        out.executions += 1;
        match std::panic::catch_unwind(|| smoe_opt::runtime::read_npz(&f).is_ok()) {
            Ok(true) => out.accepted += 1,
            Ok(false) => {}
            Err(p) => out.crashes.push(format!("npz: {}", panic_text(p))),
        }
        // Statistics (JSON or its npz sidecar mutated).
        let j = tmp.path().join("m.json");
        if i % 2 == 0 {
            std::fs::write(&j, mutate(&stats_json, &mut rng)).unwrap();
            std::fs::write(j.with_extension("npz"), &stats_npz).unwrap();
        } else {
            std::fs::write(&j, &stats_json).unwrap();
            std::fs::write(j.with_extension("npz"), mutate(&stats_npz, &mut rng)).unwrap();
        }
        out.executions += 1;
        match std::panic::catch_unwind(|| smoe_opt::calib::load(&j).is_ok()) {
            Ok(true) => out.accepted += 1,
            Ok(false) => {}
            Err(p) => out.crashes.push(format!("stats: {}", panic_text(p))),
        }
    }
    std::panic::set_hook(prev);
    out
}

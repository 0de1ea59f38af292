//! Whether a run hands whole models to a runtime or goes segment by segment: `--pipeline
//! sequential` always goes segment by segment; `auto` does when the model would not fit
//! comfortably in memory run whole.
//!
//! Run whole, the runtime holds its own copy of the model (about its bytes on disk) while
//! smoe-opt builds the written model beside it (at most as many bytes again): about twice
//! the model's bytes. That must stay under [`HEADROOM`] of the memory available (Linux
//! `MemAvailable`, capped by the cgroup's limit, or `--memory-limit`).
use super::Pipeline;
use crate::model::Model;
use serde::Serialize;

/// The share of the available memory a whole-model run may plan to use.
pub const HEADROOM: f64 = 0.7;

/// How the run hands models to a runtime, and why.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Execution {
    /// The pipeline the run uses (`auto` when it compares one-shot and sequential fits).
    pub pipeline: Pipeline,
    /// Whether calibration, the end-to-end comparisons and the fidelity measurement run the
    /// models segment by segment (one segment in a runtime at a time) rather than whole.
    pub segments: bool,
    /// Why, in words.
    pub reason: String,
    /// The most bytes of activations kept on disk between segments at once, all flows
    /// together (0 when models ran whole).
    pub activations_peak_bytes: u64,
    /// Whether the model fits in memory run whole (or the memory is unknown): only then may a
    /// segment-by-segment step that fails fall back to the whole model.
    #[serde(skip)]
    pub whole_fits: bool,
}

/// The model's bytes: on disk with its external data, else serialised.
pub fn model_bytes(model: &Model) -> u64 {
    match model.path() {
        Some(p) => crate::pipeline::bytes_on_disk(p, model),
        None => model.inline_len(),
    }
}

/// Bytes of memory this process may use: `limit` if given, else `MemAvailable` capped by the
/// cgroup (v2) limit, if known.
pub fn available(limit: Option<u64>) -> Option<u64> {
    if limit.is_some() {
        return limit;
    }
    let mem = crate::inputs::available_memory();
    let cgroup = cgroup_room();
    match (mem, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The cgroup v2 limit less its current use, when a limit is set.
fn cgroup_room() -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let cur: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(cur))
}

/// The execution for `pipeline` on a model of `bytes`, with `available` bytes of memory.
pub fn choose(pipeline: Pipeline, bytes: u64, available: Option<u64>) -> Execution {
    let gib = |b: f64| crate::inspect::human_bytes(b.max(0.0) as u64);
    let whole = 2.0 * bytes as f64;
    let whole_fits = available.is_none_or(|a| whole <= HEADROOM * a as f64);
    match (pipeline, available) {
        (Pipeline::Sequential, _) => Execution {
            pipeline,
            segments: true,
            reason: "--pipeline sequential".into(),
            activations_peak_bytes: 0,
            whole_fits,
        },
        (Pipeline::OneShot, _) => Execution {
            pipeline,
            segments: false,
            reason: "--pipeline one-shot".into(),
            activations_peak_bytes: 0,
            whole_fits,
        },
        (Pipeline::Auto, Some(a)) if whole > HEADROOM * a as f64 => Execution {
            pipeline: Pipeline::Sequential,
            segments: true,
            reason: format!(
                "auto: sequential, segment by segment: run whole, the model would need about {} \
                 (a runtime's copy and the written model), over {:.0}% of the {} available",
                gib(whole),
                100.0 * HEADROOM,
                gib(a as f64)
            ),
            activations_peak_bytes: 0,
            whole_fits,
        },
        (Pipeline::Auto, Some(a)) => Execution {
            pipeline,
            segments: false,
            reason: format!(
                "auto: run whole, the model needs about {} of the {} available",
                gib(whole),
                gib(a as f64)
            ),
            activations_peak_bytes: 0,
            whole_fits,
        },
        (Pipeline::Auto, None) => Execution {
            pipeline,
            segments: false,
            reason: "auto: the available memory is unknown; the model is run whole".into(),
            activations_peak_bytes: 0,
            whole_fits,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_goes_segment_by_segment_when_the_model_does_not_fit() {
        let gb = 1u64 << 30;
        let e = choose(Pipeline::Auto, 8 * gb, Some(16 * gb));
        assert!(e.segments && e.pipeline == Pipeline::Sequential, "{e:?}");
        let e = choose(Pipeline::Auto, 4 * gb, Some(16 * gb));
        assert!(!e.segments && e.pipeline == Pipeline::Auto, "{e:?}");
        let e = choose(Pipeline::Auto, 4 * gb, None);
        assert!(!e.segments);
        assert!(choose(Pipeline::Sequential, 1, Some(16 * gb)).segments);
        assert!(!choose(Pipeline::OneShot, 64 * gb, Some(gb)).segments);
    }
}

//! The sequential pipeline (`--pipeline`, issue 14): at budget 1.0 it writes the original
//! model; at half the bytes it runs on every multi-layer form, stores no more than the
//! budget, and keeps the first layer's one-shot fit; on the trained LM each later block's
//! output is closer to the original model's (checked independently in onnxruntime) than the
//! one-shot fit's; the same flags give the same bytes; misuse is a usage error.
#![cfg(feature = "tract")]
mod common;
use common::*;
use std::path::Path;

/// Multi-layer models of several exporter forms (TorchScript and dynamo, sigmoid and
/// grouped routers, gpt-oss activation, onnxruntime-genai's fused op).
const FORMS: [&str; 5] = [
    "mixtral_v4_ts",
    "deepseekv3_v5_ts_raw",
    "gptoss_v5_dynamo",
    "qwen3moe_v5_ts_raw",
    "ortgenai_gptoss_fp32",
];

fn dir(name: &str) -> std::path::PathBuf {
    root().join("testdata/models").join(name)
}

/// The independent onnxruntime check of a written model against the original (held-out
/// relative L2 of the outputs on io.npz).
fn rel_l2(py: &Path, dir: &Path, out: &Path) -> f64 {
    let ort_out = out.with_extension("ort.npz");
    let r = run_py(
        py,
        "check_reduced.py",
        &[
            dir.join("model.onnx").to_str().unwrap(),
            out.to_str().unwrap(),
            dir.join("io.npz").to_str().unwrap(),
            "0",
            ort_out.to_str().unwrap(),
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    v["rel_l2"].as_f64().unwrap()
}

#[test]
fn full_budget_sequential_writes_the_original() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for name in FORMS {
        let d = dir(name);
        let out = tmp.path().join(format!("{name}.onnx"));
        let io = d.join("io.npz");
        let r = reduce(
            &d.join("model.onnx"),
            &out,
            &[
                "--calib",
                io.to_str().unwrap(),
                "--target-size",
                "1",
                "--pipeline",
                "sequential",
            ],
        );
        assert!(r.ok, "{name}: {}", r.stderr);
        assert_eq!(r.report["compression"]["pipeline"], "sequential", "{name}");
        let tol: f64 = out_rtol(&d, "1e-5").parse().unwrap();
        let e = rel_l2(&py, &d, &out);
        assert!(e < tol, "{name}: {e}");
    }
}

#[test]
fn half_budget_sequential_runs_on_every_form() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for name in FORMS {
        let d = dir(name);
        let io = d.join("io.npz");
        let mut reports = Vec::new();
        for pipeline in ["one-shot", "sequential"] {
            let out = tmp.path().join(format!("{name}.{pipeline}.onnx"));
            let r = reduce(
                &d.join("model.onnx"),
                &out,
                &[
                    "--calib",
                    io.to_str().unwrap(),
                    "--target-size",
                    "0.5",
                    "--compress",
                    "neurons",
                    "--pipeline",
                    pipeline,
                ],
            );
            assert!(r.ok, "{name} {pipeline}: {}", r.stderr);
            let c = &r.report["compression"];
            assert_eq!(c["pipeline"], pipeline, "{name}");
            assert!(
                c["bytes_after"].as_u64().unwrap() <= c["budget_bytes"].as_u64().unwrap(),
                "{name} {pipeline}: {c}"
            );
            // The written model runs in onnxruntime and stays near the original.
            let e = rel_l2(&py, &d, &out);
            assert!(e.is_finite() && e < 1.0, "{name} {pipeline}: {e}");
            reports.push(r.report);
        }
        let layers = |r: &serde_json::Value| r["layers"].as_array().unwrap().clone();
        let (one, seq) = (layers(&reports[0]), layers(&reports[1]));
        assert!(one.len() >= 2, "{name}: a multi-layer model");
        // The first layer sees the original's inputs either way: its fit is the one-shot one.
        assert_eq!(
            one[0]["compression"], seq[0]["compression"],
            "{name}: first layer"
        );
    }
}

#[test]
fn bounded_plan_writes_what_it_measured() {
    // `--pipeline sequential` with a fixed family plans one layer at a time (spectra only,
    // one global allocation) and writes each layer into the output as it is refitted,
    // measuring the held-out data segment by segment alongside. The first layer's inputs are
    // the original's, so its form must be the one the all-at-once one-shot planner gives it
    // (same allocation); the fidelity reported was measured on the layers in memory, and
    // onnxruntime measuring the written file (weights copied out of the spill file) must
    // find the same number.
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for name in FORMS {
        let d = dir(name);
        let io = d.join("io.npz");
        for family in ["low-rank", "base-delta"] {
            let mut reports = Vec::new();
            for pipeline in ["one-shot", "sequential"] {
                let out = tmp.path().join(format!("{name}.{family}.{pipeline}.onnx"));
                let r = reduce(
                    &d.join("model.onnx"),
                    &out,
                    &[
                        "--calib",
                        io.to_str().unwrap(),
                        "--eval-data",
                        io.to_str().unwrap(),
                        "--target-size",
                        "0.5",
                        "--compress",
                        family,
                        "--pipeline",
                        pipeline,
                        "--external-data",
                    ],
                );
                assert!(r.ok, "{name} {family} {pipeline}: {}", r.stderr);
                let c = &r.report["compression"];
                assert!(
                    c["bytes_after"].as_u64().unwrap() <= c["budget_bytes"].as_u64().unwrap(),
                    "{name} {family} {pipeline}: {c}"
                );
                if pipeline == "sequential" {
                    let plan = c["plan"].as_str().unwrap();
                    assert!(
                        plan.contains("planned one layer at a time"),
                        "{name}: {plan}"
                    );
                    let mine = r.report["fidelity"]["rel_l2"].as_f64().unwrap();
                    let ort = rel_l2(&py, &d, &out);
                    // Both measure the same weights on the same samples; tract and
                    // onnxruntime differ by float32 rounding only.
                    assert!(
                        (mine - ort).abs() <= 1e-4 + 1e-3 * ort,
                        "{name} {family}: reported {mine}, onnxruntime {ort}"
                    );
                }
                reports.push(r.report);
            }
            let first = |r: &serde_json::Value| r["layers"][0]["compression"]["matrices"].clone();
            let forms = |m: serde_json::Value| -> Vec<(String, Option<u64>, u64)> {
                m.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| {
                        (
                            x["form"].as_str().unwrap().to_string(),
                            x["rank"].as_u64(),
                            x["bytes"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            };
            assert_eq!(
                forms(first(&reports[0])),
                forms(first(&reports[1])),
                "{name} {family}: the first layer's allocation"
            );
        }
    }
}

/// The held-out fidelity of two reports (segment by segment, `rs`; whole, `rw`) agrees to
/// 1e-6 relative.
fn same_fidelity(name: &str, rs: &serde_json::Value, rw: &serde_json::Value) {
    for key in ["rel_l2", "cosine"] {
        let (a, b) = (
            rs["fidelity"][key].as_f64().unwrap(),
            rw["fidelity"][key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1e-6),
            "{name}: fidelity {key} {a} segment by segment, {b} whole"
        );
    }
}

#[test]
fn bounded_plan_segment_by_segment_equals_the_whole_model() {
    // The plan made one layer at a time writes its layers as it goes when segment by segment
    // (weights spilled to a temporary file, fidelity measured alongside), and writes the
    // plans at the end when the models run whole: the same bytes and the same fidelity.
    if python().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for name in ["mixtral_v4_ts", "gptoss_v5_dynamo", "ortgenai_gptoss_fp32"] {
        let d = dir(name);
        let io = d.join("io.npz");
        let args = [
            "--calib",
            io.to_str().unwrap(),
            "--target-size",
            "0.5",
            "--compress",
            "low-rank",
            "--pipeline",
            "sequential",
            "--external-data",
        ];
        let mut runs = Vec::new();
        for whole in [false, true] {
            // The same file name (the model names its data file), in two folders.
            let sub = tmp.path().join(format!("{name}.{whole}"));
            std::fs::create_dir_all(&sub).unwrap();
            let out = sub.join("out.onnx");
            let env: &[(&str, &str)] = if whole {
                &[("SMOE_SEQUENTIAL_WHOLE_MODEL", "1")]
            } else {
                &[]
            };
            let run = reduce_env(&d.join("model.onnx"), &out, &args, env);
            assert!(run.ok, "{name}: {}", run.stderr);
            let r = run.report;
            assert_eq!(r["execution"]["segments"], !whole, "{name}");
            let plan = r["compression"]["plan"].as_str().unwrap().to_string();
            assert!(
                plan.contains("planned one layer at a time"),
                "{name}: {plan}"
            );
            let bytes = model_and_data(&out);
            runs.push((bytes, r));
        }
        let ((ms, ds), rs) = &runs[0];
        let ((mw, dw), rw) = &runs[1];
        assert!(
            ds == dw,
            "{name}: other weights segment by segment than whole"
        );
        assert!(
            ms == mw,
            "{name}: other model segment by segment than whole"
        );
        same_fidelity(name, rs, rw);
    }
}

/// testdata/lm's second MoE block output.
const LM_BLOCK_OUT: &str = "/m/model/layers.1/block_sparse_moe/Reshape_25_output_0";

#[test]
fn sequential_fit_tracks_the_original_block_outputs() {
    let Some(py) = python() else { return };
    let lm = root().join("testdata/lm");
    let tmp = tempfile::tempdir().unwrap();
    let calib = lm.join("calib.txt");
    let tok = lm.join("tokenizer.json");
    for frac in ["0.5", "0.25"] {
        let mut outs = Vec::new();
        for pipeline in ["one-shot", "sequential", "sequential"] {
            let out = tmp
                .path()
                .join(format!("lm.{frac}.{pipeline}.{}.onnx", outs.len()));
            let r = reduce(
                &lm.join("model.onnx"),
                &out,
                &[
                    "--calib-text",
                    calib.to_str().unwrap(),
                    "--tokenizer",
                    tok.to_str().unwrap(),
                    "--seq-len",
                    "64",
                    "--target-size",
                    frac,
                    "--compress",
                    "neurons",
                    "--pipeline",
                    pipeline,
                    "-q",
                ],
            );
            assert!(r.ok, "{frac} {pipeline}: {}", r.stderr);
            outs.push(out);
        }
        // Deterministic: the same flags give the same bytes.
        assert!(
            std::fs::read(&outs[1]).unwrap() == std::fs::read(&outs[2]).unwrap(),
            "{frac}: sequential output differs between runs"
        );
        // Held-out data: the second block's output against the original's, same tokens.
        let r = run_py(
            &py,
            "check_sequential.py",
            &[
                lm.join("model.onnx").to_str().unwrap(),
                outs[0].to_str().unwrap(),
                outs[1].to_str().unwrap(),
                lm.join("eval.npz").to_str().unwrap(),
                LM_BLOCK_OUT,
            ],
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        let (one, seq) = (
            v["one_shot"].as_f64().unwrap(),
            v["sequential"].as_f64().unwrap(),
        );
        assert!(one > 0.0 && seq > 0.0, "{frac}: {v}");
        assert!(seq < one, "{frac}: sequential {seq} >= one-shot {one}");
    }
}

#[test]
fn misuse_is_a_usage_error() {
    let d = dir("mixtral_v4_ts");
    let io = d.join("io.npz");
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("s.json");
    let o = bin()
        .args(["calibrate"])
        .arg(d.join("model.onnx"))
        .arg("--calib")
        .arg(&io)
        .arg("-o")
        .arg(&stats)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("x.onnx");
    for (what, args) in [
        (
            "statistics without calibration data",
            vec![
                "--stats",
                stats.to_str().unwrap(),
                "--target-size",
                "0.5",
                "--pipeline",
                "sequential",
            ],
        ),
        (
            "merging, not compressing",
            vec![
                "--calib",
                io.to_str().unwrap(),
                "--keep",
                "0.5",
                "--pipeline",
                "sequential",
            ],
        ),
    ] {
        let r = reduce(&d.join("model.onnx"), &out, &args);
        assert_eq!(r.code, Some(2), "{what}: {}", r.stderr);
        assert!(
            r.stderr.contains("--pipeline sequential"),
            "{what}: {}",
            r.stderr
        );
        assert!(!out.exists(), "{what}: partial output");
    }
}

/// The sequential refit runs segment by segment (one segment in a runtime at a time) and
/// writes the same bytes as the refit on the whole model (each layer calibrated on the whole
/// partially rewritten model, paired with the whole original; `SMOE_SEQUENTIAL_WHOLE_MODEL`
/// selects it, and runs the first calibration and the fidelity on the whole models too):
/// the segments compute exactly what the whole model does — same bytes, same fidelity —
/// and the report says how the models ran. Also on the
/// onnxruntime-only QMoE graph. On the shape-specialised Switch export, whose exported block
/// cannot run on a rewritten model's activations, both refits calibrate through a re-emitted
/// block (the whole model re-emits every block still as exported, a segment only its own),
/// so their sums round differently: the same plan (bytes, ranks and groups per layer) with
/// errors equal within 1e-9 (both are ~1e-11 there).
#[test]
fn segment_by_segment_refit_equals_the_whole_model_refit() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FORMS
        .iter()
        .copied()
        .chain(["switch_v4_ts", "ortgenai_lfm2moe_int4"])
    {
        let d = dir(name);
        let io = d.join("io.npz");
        // The builder's QMoE graph needs onnxruntime, whose CPU MatMulNBits (accuracy level 4)
        // quantises its activations to int8, and tract runs the segments it can (its head
        // exactly): one runtime for everything compares like with like.
        let runtime = if name.starts_with("ortgenai_lfm2") {
            "ort"
        } else {
            "auto"
        };
        let args = [
            "--calib",
            io.to_str().unwrap(),
            "--target-size",
            "0.5",
            "--pipeline",
            "sequential",
            "--runtime",
            runtime,
        ];
        let seg = tmp.path().join(format!("{name}.seg.onnx"));
        let r = reduce(&d.join("model.onnx"), &seg, &args);
        assert!(r.ok, "{name}: {}", r.stderr);
        let plan = r.report["compression"]["plan"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(plan.contains("segment by segment"), "{name}: {plan}");
        let whole = tmp.path().join(format!("{name}.whole.onnx"));
        let run = reduce_env(
            &d.join("model.onnx"),
            &whole,
            &args,
            &[("SMOE_SEQUENTIAL_WHOLE_MODEL", "1")],
        );
        assert!(run.ok, "{name}: {}", run.stderr);
        let w = run.report;
        let (es, ew) = (&r.report["execution"], &w["execution"]);
        assert_eq!(es["segments"], true, "{name}: {es}");
        assert_eq!(ew["segments"], false, "{name}: {ew}");
        assert!(
            r.report["calibration"]["source"]
                .as_str()
                .unwrap()
                .ends_with("segment by segment"),
            "{name}: {}",
            r.report["calibration"]
        );
        let (fs, fw) = (&r.report["fidelity"], &w["fidelity"]);
        assert!(
            fs["reference"]
                .as_str()
                .unwrap()
                .contains("segment by segment"),
            "{name}: {fs}"
        );
        let rewritten = r.report["layers"].as_array().unwrap().len();
        assert_eq!(
            fs["blocks"].as_array().map_or(0, |b| b.len()),
            rewritten,
            "{name}: one figure per rewritten block: {fs}"
        );
        if name != "switch_v4_ts" {
            assert!(
                std::fs::read(&seg).unwrap() == std::fs::read(&whole).unwrap(),
                "{name}: the segment-by-segment run wrote other bytes than the whole-model one"
            );
            // The same metrics from the segments' outputs as from the whole models'.
            for key in ["rel_l2", "cosine", "positions"] {
                let (a, b) = (fs[key].as_f64().unwrap(), fw[key].as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-6),
                    "{name}: fidelity {key} {a} segment by segment, {b} whole"
                );
            }
            continue;
        }
        let (a, b) = (
            r.report["layers"].as_array().unwrap(),
            w["layers"].as_array().unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x["groups"], y["groups"], "{name}");
            let (cx, cy) = (&x["compression"], &y["compression"]);
            assert_eq!(cx["bytes_after"], cy["bytes_after"], "{name}");
            let ranks = |c: &serde_json::Value| {
                c["matrices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["rank"].clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(ranks(cx), ranks(cy), "{name}");
            let (ex, ey) = (cx["error"].as_f64().unwrap(), cy["error"].as_f64().unwrap());
            assert!((ex - ey).abs() <= 1e-9, "{name}: errors {ex} and {ey}");
        }
    }
}

/// Segment by segment, the report's fidelity at each rewritten block's cut and end to end is
/// what onnxruntime computes on the whole written and original models (Python, with the
/// block outputs exposed; a rewritten block keeps its output's name). Tolerance: tract and
/// onnxruntime differ by ~1e-6 relative on these activations; the figures compared are
/// 0.01–1, so 1e-3 relative leaves room for rounding and none for a wrong pairing of tensors
/// or of padding rows.
#[test]
fn segmented_fidelity_matches_onnxruntime_at_every_cut() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "mixtral_v4_ts",
        "qwen3moe_v5_ts_raw",
        "deepseekv3_v5_ts_raw",
    ] {
        let d = dir(name);
        let io = d.join("io.npz");
        let out = tmp.path().join(format!("{name}.onnx"));
        let r = reduce(
            &d.join("model.onnx"),
            &out,
            &[
                "--calib",
                io.to_str().unwrap(),
                "--eval-data",
                io.to_str().unwrap(),
                "--target-size",
                "0.5",
                "--pipeline",
                "sequential",
            ],
        );
        assert!(r.ok, "{name}: {}", r.stderr);
        let f = &r.report["fidelity"];
        let blocks = f["blocks"].as_array().unwrap();
        assert!(blocks.len() >= 2, "{name}: {f}");
        let mut args = vec![
            d.join("model.onnx").to_str().unwrap().to_string(),
            out.to_str().unwrap().to_string(),
            io.to_str().unwrap().to_string(),
        ];
        args.extend(
            blocks
                .iter()
                .map(|b| b["output"].as_str().unwrap().to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let c = run_py(&py, "check_cuts.py", &args);
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
        let v: serde_json::Value = serde_json::from_slice(&c.stdout).unwrap();
        for b in blocks {
            let theirs = &v[b["output"].as_str().unwrap()];
            for key in ["rel_l2", "cosine"] {
                let (a, t) = (b[key].as_f64().unwrap(), theirs[key].as_f64().unwrap());
                assert!(
                    (a - t).abs() <= 1e-3 * t.abs() + 1e-6,
                    "{name} {}: {key} {a} reported, {t} in onnxruntime",
                    b["block"]
                );
            }
        }
        // The later block's output moved: the figures are not all zero by construction.
        assert!(
            blocks.iter().any(|b| b["rel_l2"].as_f64().unwrap() > 1e-3),
            "{name}: {f}"
        );
        let ours = f["rel_l2"].as_f64().unwrap();
        let theirs = rel_l2(&py, &d, &out);
        assert!(
            (ours - theirs).abs() <= 1e-3 * theirs + 1e-6,
            "{name}: end to end {ours} reported, {theirs} in onnxruntime"
        );
    }
}

/// `--pipeline auto` goes segment by segment (and sequential) when the model would not fit
/// in the memory available run whole (`--memory-limit` stands for a small machine), writing
/// what `--pipeline sequential` writes; with room it runs the models whole. The report says
/// which and why.
#[test]
fn auto_goes_segment_by_segment_when_memory_is_short() {
    let tmp = tempfile::tempdir().unwrap();
    let d = dir("mixtral_v4_ts");
    let io = d.join("io.npz");
    let base = ["--calib", io.to_str().unwrap(), "--target-size", "0.5"];
    let run = |tag: &str, extra: &[&str]| {
        let out = tmp.path().join(format!("{tag}.onnx"));
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let r = reduce(&d.join("model.onnx"), &out, &args);
        assert!(r.ok, "{tag}: {}", r.stderr);
        (std::fs::read(&out).unwrap(), r.report)
    };
    let (short, rs) = run("short", &["--memory-limit", "1M"]);
    let e = &rs["execution"];
    assert_eq!(e["segments"], true, "{e}");
    assert_eq!(e["pipeline"], "sequential", "{e}");
    assert!(e["reason"].as_str().unwrap().starts_with("auto:"), "{e}");
    assert_eq!(rs["compression"]["pipeline"], "sequential");
    let (seq, _) = run("seq", &["--pipeline", "sequential"]);
    assert!(
        short == seq,
        "auto with little memory wrote other bytes than sequential"
    );
    let (_, rr) = run("roomy", &["--memory-limit", "1T"]);
    let e = &rr["execution"];
    assert_eq!(e["segments"], false, "{e}");
    assert_eq!(e["pipeline"], "auto", "{e}");
    // With statistics from a file and no calibration data there is nothing to refit on:
    // still segment by segment, the one-shot fit stands (it used to be refused as if
    // `--pipeline sequential` had been asked for).
    let stats = tmp.path().join("stats.json");
    let o = bin()
        .arg("calibrate")
        .arg(d.join("model.onnx"))
        .arg("--calib")
        .arg(&io)
        .arg("-o")
        .arg(&stats)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("stats.onnx");
    let r = reduce(
        &d.join("model.onnx"),
        &out,
        &[
            "--stats",
            stats.to_str().unwrap(),
            "--target-size",
            "0.5",
            "--memory-limit",
            "1M",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let e = &r.report["execution"];
    assert_eq!(e["segments"], true, "{e}");
    assert_eq!(e["pipeline"], "auto", "{e}");
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("one-shot fit stands"),
        "{e}"
    );
    // A size that is not one is a usage error.
    let out = tmp.path().join("bad.onnx");
    let r = reduce(
        &d.join("model.onnx"),
        &out,
        &[base.as_slice(), &["--memory-limit", "lots"]].concat(),
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--memory-limit"), "{}", r.stderr);
    assert!(!out.exists());
}

/// `a b c` -> bytes, for the human sizes smoe-opt prints (`27.0 MiB`).
fn parse_human(v: &str, unit: &str) -> f64 {
    let x: f64 = v.parse().unwrap();
    x * match unit.trim_end_matches([',', ')', ';']) {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u}"),
    }
}

/// `--dry-run` under `--pipeline sequential` says how the models will run and how much disk
/// the activations between segments take (measured on one sample at the first cut); the run
/// then reports its measured peak, which the estimate must be close to (within 25%: later
/// cuts of the LM carry what the first does, and one batch is in flight at a time).
#[test]
fn dry_run_estimates_the_activation_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = root().join("testdata/lm");
    let (calib, tok, eval) = (
        lm.join("calib.txt"),
        lm.join("tokenizer.json"),
        lm.join("eval.npz"),
    );
    let args = [
        "--target-size",
        "0.5",
        "--compress",
        "low-rank",
        "--pipeline",
        "sequential",
        "--calib-text",
        calib.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
    ];
    let out = tmp.path().join("lm.onnx");
    let o = bin()
        .arg(lm.join("model.onnx"))
        .arg("-o")
        .arg(&out)
        .args(args)
        .arg("--dry-run")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!out.exists(), "a dry run wrote the model");
    assert!(
        text.contains("models run segment by segment (--pipeline sequential)"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("activations between segments"))
        .unwrap_or_else(|| panic!("{text}"));
    // "... two flows at once (...): about X MiB under DIR (...)"
    let w: Vec<&str> = line.split_whitespace().collect();
    let at = w.iter().rposition(|&x| x == "about").unwrap();
    let estimate = parse_human(w[at + 1], w[at + 2]);
    let r = reduce(&lm.join("model.onnx"), &out, &args);
    assert!(r.ok, "{}", r.stderr);
    let peak = r.report["execution"]["activations_peak_bytes"]
        .as_f64()
        .unwrap();
    assert!(
        peak > 0.0 && (estimate / peak - 1.0).abs() <= 0.25,
        "dry run estimated {estimate} bytes, the run kept at most {peak}: {line}"
    );
}

/// Mounts a tmpfs of `mib` MiB at `dir` (root with mount rights only: else None and the
/// caller skips, saying so).
fn small_disk(dir: &Path, mib: u32) -> Option<impl Drop> {
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mounted(dir.to_path_buf()))
}

/// Too little disk for the activations between segments: when the model does not fit in
/// memory run whole (`--memory-limit`), the run stops early with a usage error naming the
/// folder and what it needs, writes nothing and leaves no activation files; when it fits,
/// each step falls back to the whole model and the run succeeds, saying so.
#[test]
fn short_disk_for_the_activations_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("small");
    std::fs::create_dir(&disk).unwrap();
    let Some(mounted) = small_disk(&disk, 8) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root with mount rights)");
        return;
    };
    let lm = root().join("testdata/lm");
    let (calib, tok, eval) = (
        lm.join("calib.txt"),
        lm.join("tokenizer.json"),
        lm.join("eval.npz"),
    );
    let args = [
        "--target-size",
        "0.5",
        "--compress",
        "low-rank",
        "--calib-text",
        calib.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
    ];
    let out = tmp.path().join("short.onnx");
    let o = bin()
        .env("TMPDIR", &disk)
        .arg(lm.join("model.onnx"))
        .arg("-o")
        .arg(&out)
        .args(args)
        .args(["--memory-limit", "1M"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("activations between segments need about") && err.contains("TMPDIR"),
        "{err}"
    );
    assert!(err.contains(disk.to_str().unwrap()), "{err}");
    assert!(!out.exists(), "a model was written");
    let left: Vec<_> = std::fs::read_dir(&disk)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("smoe-opt"))
        .collect();
    assert!(left.is_empty(), "activation files left: {left:?}");
    // With memory to spare, the whole model stands in.
    let o = bin()
        .env("TMPDIR", &disk)
        .arg(lm.join("model.onnx"))
        .arg("-o")
        .arg(&out)
        .args(args)
        .args(["--pipeline", "sequential", "--report"])
        .arg(tmp.path().join("r.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("refitting on the whole model"), "{err}");
    let r: serde_json::Value = fitting_file(Schema::Report, &tmp.path().join("r.json"));
    let plan = r["compression"]["plan"].as_str().unwrap();
    assert!(plan.ends_with("(on the whole model)"), "{plan}");
    drop(mounted);
}

/// Merging when memory is short (`--memory-limit` stands for a small machine): each layer is
/// merged, written into the output and moved out of memory before the next is read, the
/// held-out fidelity measured segment by segment alongside. It writes the bytes that merging
/// every layer at once on the whole models writes, with the same groups and the same
/// fidelity, for merges and for pruning, on several multi-layer forms.
#[test]
fn merging_layer_by_layer_writes_what_merging_at_once_writes() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, method) in [
        ("mixtral_v4_ts", "m-smoe"),
        ("gptoss_v5_dynamo", "m-smoe"),
        ("ortgenai_gptoss_fp32", "m-smoe"),
        ("qwen3moe_v5_ts_raw", "prune-frequency"),
    ] {
        let d = dir(name);
        let io = d.join("io.npz");
        let mut runs = Vec::new();
        for (tag, limit) in [("short", "64K"), ("roomy", "1T")] {
            let sub = tmp.path().join(format!("{name}.{tag}"));
            std::fs::create_dir_all(&sub).unwrap();
            let out = sub.join("out.onnx");
            let args = [
                "--calib",
                io.to_str().unwrap(),
                "--keep",
                "0.5",
                "--method",
                method,
                "--external-data",
                "--memory-limit",
                limit,
            ];
            let r = reduce(&d.join("model.onnx"), &out, &args);
            assert!(r.ok, "{name} {tag}: {}", r.stderr);
            assert_eq!(
                r.report["execution"]["segments"],
                tag == "short",
                "{name} {tag}: {}",
                r.report["execution"]
            );
            runs.push((model_and_data(&out), r.report));
        }
        let ((ms, ds), rs) = &runs[0];
        let ((mw, dw), rw) = &runs[1];
        assert!(
            ms == mw,
            "{name}: another model layer by layer than at once"
        );
        assert!(
            ds == dw,
            "{name}: other weights layer by layer than at once"
        );
        assert_eq!(rs["layers"], rw["layers"], "{name}: other plans");
        let n = rs["layers"].as_array().unwrap().len();
        assert!(n >= 2, "{name}: {n} layers");
        same_fidelity(name, rs, rw);
        assert_eq!(
            rs["fidelity"]["blocks"].as_array().map(Vec::len),
            Some(n),
            "{name}: every merged block measured at its cut: {}",
            rs["fidelity"]
        );
    }
}

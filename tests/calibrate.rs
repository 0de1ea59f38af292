//! Calibration statistics (tract and onnxruntime) against an independent onnxruntime + numpy reference:
//! counts exactly, floats within 1e-4 relative (tract vs onnxruntime hidden states differ
//! by ~1e-7; the statistics are sums of O(1) terms); padding excluded; batch size does not
//! change the statistics.
#![cfg(feature = "tract")]
mod common;
use common::*;
use serde_json::Value;
use smoe_opt::Model;

fn calibrate(dir: &std::path::Path, out: &std::path::Path, batch: usize) {
    calibrate_with(dir, out, batch, "auto")
}

fn calibrate_with(dir: &std::path::Path, out: &std::path::Path, batch: usize, runtime: &str) {
    let o = bin()
        .arg("calibrate")
        .arg(dir.join("model.onnx"))
        .arg("--calib")
        .arg(dir.join("io.npz"))
        .args(["--runtime", runtime])
        .args(["--batch", &batch.to_string(), "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn statistics_match_the_numpy_reference() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (name, dir) in models() {
        let model = Model::load(dir.join("model.onnx")).unwrap();
        let det = smoe_opt::moe::detect(&model.graph);
        let blocks = det.identified_blocks();
        if blocks.is_empty() {
            continue;
        }
        let bj = tmp.path().join(format!("{name}.blocks.json"));
        std::fs::write(&bj, serde_json::to_string(&blocks).unwrap()).unwrap();
        for runtime in ["tract", "ort"] {
            if runtime == "tract" && !standard_ops(&model) {
                continue;
            }
            let stats = tmp.path().join(format!("{name}.{runtime}.json"));
            calibrate_with(&dir, &stats, 1, runtime);
            let r = run_py(
                &py,
                "calib_ref.py",
                &[
                    dir.join("model.onnx").to_str().unwrap(),
                    bj.to_str().unwrap(),
                    dir.join("io.npz").to_str().unwrap(),
                    stats.to_str().unwrap(),
                    "--rtol",
                    ref_rtol(&dir),
                ],
            );
            assert!(
                r.status.success(),
                "{name} ({runtime}): {}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
    }
}

#[test]
fn batch_size_does_not_change_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("testdata/models/qwen2moe_v4_ts");
    let (a, b) = (tmp.path().join("b1.json"), tmp.path().join("b16.json"));
    calibrate(&dir, &a, 1);
    calibrate(&dir, &b, 16);
    let ja: Value = fitting_file(Schema::Stats, &a);
    let jb: Value = fitting_file(Schema::Stats, &b);
    for (la, lb) in ja["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(jb["layers"].as_array().unwrap())
    {
        assert_eq!(la["counts"], lb["counts"]);
        assert_eq!(la["tokens"], lb["tokens"]);
        for key in ["mean_weight", "reap"] {
            for (x, y) in la[key]
                .as_array()
                .unwrap()
                .iter()
                .zip(lb[key].as_array().unwrap())
            {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
                    "{key}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn padding_is_excluded() {
    // io.npz right-pads the second row by 3 tokens: 2x16 positions, 29 real tokens.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s.json");
    calibrate(&root().join("testdata/models/mixtral_v4_ts"), &out, 2);
    let j: Value = fitting_file(Schema::Stats, &out);
    for l in j["layers"].as_array().unwrap() {
        assert_eq!(l["tokens"], 29);
        let total: u64 = l["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(total, 29 * 2, "top-2 over 29 tokens");
    }
}

#[test]
fn input_mismatch_lists_what_the_model_expects() {
    let tmp = tempfile::tempdir().unwrap();
    let o = bin()
        .arg("calibrate")
        .arg(root().join("testdata/models/mixtral_v4_ts/model.onnx"))
        .arg("--calib")
        .arg(root().join("testdata/variants/mixtral_n4_k1/io.npz"))
        .arg("-o")
        .arg(tmp.path().join("s.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("input_ids int64 [batch, seq]") && err.contains("position_ids"),
        "{err}"
    );
    assert!(!tmp.path().join("s.json").exists());
}

#[test]
fn text_calibration_matches_the_python_tokenizer_and_reference() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("testdata/models/olmoe_v4_ts");
    let text = root().join("testdata/text/calib.txt");
    let tok = root().join("testdata/text/tokenizer.json");
    let stats = tmp.path().join("s.json");
    let o = bin()
        .arg("calibrate")
        .arg(dir.join("model.onnx"))
        .arg("--calib-text")
        .arg(&text)
        .arg("--tokenizer")
        .arg(&tok)
        .args(["--seq-len", "48", "--batch", "16", "-o"])
        .arg(&stats)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = tmp.path().join("d.npz");
    let r = run_py(
        &py,
        "text_to_npz.py",
        &[
            text.to_str().unwrap(),
            tok.to_str().unwrap(),
            "48",
            data.to_str().unwrap(),
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let model = Model::load(dir.join("model.onnx")).unwrap();
    let det = smoe_opt::moe::detect(&model.graph);
    let bj = tmp.path().join("b.json");
    std::fs::write(&bj, serde_json::to_string(&det.blocks).unwrap()).unwrap();
    let r = run_py(
        &py,
        "calib_ref.py",
        &[
            dir.join("model.onnx").to_str().unwrap(),
            bj.to_str().unwrap(),
            data.to_str().unwrap(),
            stats.to_str().unwrap(),
        ],
    );
    assert!(
        r.status.success(),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn data_free_statistics_are_uniform_and_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s.json");
    let o = bin()
        .arg("calibrate")
        .arg(root().join("testdata/models/olmoe_v4_ts/model.onnx"))
        .arg("--data-free")
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("data-free"));
    let j: Value = fitting_file(Schema::Stats, &out);
    assert_eq!(j["runtime"], "none");
    for l in j["layers"].as_array().unwrap() {
        for f in l["frequency"].as_array().unwrap() {
            assert_eq!(f.as_f64().unwrap(), 1.0 / 16.0);
        }
        assert_eq!(l["logit_cosine"][3][3].as_f64().unwrap(), 1.0);
    }
}

#[test]
fn saved_statistics_load_back_exactly() {
    let dir = root().join("testdata/models/qwen2moe_v4_ts");
    let model = Model::load(dir.join("model.onnx")).unwrap();
    let det = smoe_opt::moe::detect(&model.graph);
    let opts = smoe_opt::calib::CalibOptions {
        runtime: smoe_opt::calib::Runtime::Tract,
        #[cfg(feature = "ort")]
        ep: Default::default(),
        source: smoe_opt::calib::Source::Npz(dir.join("io.npz")),
        batch: 2,
        stats: smoe_opt::calib::stats::StatsConfig {
            reservoir: 5,
            ..Default::default()
        },
        progress: false,
    };
    let stats = smoe_opt::calib::calibrate(&model, &det, &opts).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("stats.json");
    smoe_opt::calib::save(&stats, &json).unwrap();
    let back = smoe_opt::calib::load(&json).unwrap();
    assert_eq!(back.layers.len(), stats.layers.len());
    for (a, b) in stats.layers.iter().zip(&back.layers) {
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.frequency, b.frequency);
        assert_eq!(a.logit_cosine, b.logit_cosine);
        assert_eq!(a.mean_output, b.mean_output);
        assert_eq!(a.input_moments, b.input_moments);
        assert_eq!(a.samples, b.samples);
        assert!(a.samples.iter().all(|s| s.len() <= 5), "reservoir cap");
    }
}

#[test]
fn past_key_value_inputs_are_fed_as_empty_caches() {
    // onnxruntime-genai builder models take past caches as inputs; token data (text, random
    // ids) does not give them. Fed empty (head size found from the graph: GroupQueryAttention's
    // packed projection in fp32 and in the `-e cuda` fp16 graph, the concatenated new keys in
    // the `-e cpu` fp16 MultiHeadAttention path), the statistics equal those of the io.npz run, whose caches the generator made.
    if python().is_none() {
        return; // onnxruntime (contrib attention ops) is needed
    }
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "ortgenai_gptoss_fp32",
        "ortgenai_gptoss_fp16",
        "ortgenai_gptoss_fp16_cuda",
        // Convolution states beside the caches; the head size from the value slice.
        "ortgenai_lfm2moe_fp32",
        "ortgenai_lfm2moe_fp16",
        // QMoE experts; an int4 embedding (GatherBlockQuantized).
        "ortgenai_lfm2moe_int4",
        "ortgenai_lfm2moe_int8",
    ] {
        let dir = root().join("testdata/models").join(name);
        // The token ids of io.npz alone, without its caches.
        let io = smoe_opt::runtime::read_npz(&dir.join("io.npz")).unwrap();
        let ids = io.iter().find(|(k, _)| k == "input_ids").unwrap().1.clone();
        let smoe_opt::runtime::Value::I64(ids) = ids else {
            panic!("int64 ids")
        };
        let npz = tmp.path().join(format!("{name}.ids.npz"));
        let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&npz).unwrap());
        w.add_array("input_ids", &ids).unwrap();
        let mask = ids.mapv(|_| 1i64);
        w.add_array("attention_mask", &mask).unwrap();
        if io.iter().any(|(k, _)| k == "position_ids") {
            let pos = ndarray::ArrayD::from_shape_fn(ids.raw_dim(), |d| d[1] as i64);
            w.add_array("position_ids", &pos).unwrap();
        }
        w.finish().unwrap();
        let stats = |data: &std::path::Path, out: &str| -> serde_json::Value {
            let out = tmp.path().join(out);
            let o = bin()
                .arg("calibrate")
                .arg(dir.join("model.onnx"))
                .arg("--calib")
                .arg(data)
                .args(["--runtime", "ort", "-o"])
                .arg(&out)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            fitting_file(Schema::Stats, &out)
        };
        // (Not `{name}.ids.json`: its sidecar would be the `.ids.npz` input itself.)
        let a = stats(&npz, &format!("{name}.stats-from-ids.json"));
        let b = stats(&dir.join("io.npz"), &format!("{name}.io.json"));
        for (la, lb) in a["layers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(b["layers"].as_array().unwrap())
        {
            assert_eq!(la["counts"], lb["counts"], "{name}");
        }
        // Random ids: the vocabulary is read through the tied LM head (Transpose) or the
        // quantised embedding's scales; every token is routed to top-k experts.
        let out = tmp.path().join(format!("{name}.random.json"));
        let o = bin()
            .arg("calibrate")
            .arg(dir.join("model.onnx"))
            .args(["--calib-random", "3", "--seq-len", "6", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value = fitting_file(Schema::Stats, &out);
        for l in r["layers"].as_array().unwrap() {
            let routed: u64 = l["counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_u64().unwrap())
                .sum();
            assert_eq!(routed, 3 * 6 * 2, "{name}: top-2 of 18 tokens");
        }
    }
}

#[test]
fn routed_only_statistics_match_and_refuse_output_grouping() {
    // Without every expert's output on every token (what merging by router logits and REAP
    // need), the routing statistics and REAP scores are the same; the mean outputs are
    // absent, and output-based grouping (hc-smoe) says so instead of grouping on zeros.
    let dir = root().join("testdata/models/mixtral_v4_ts");
    let model = Model::load(dir.join("model.onnx")).unwrap();
    let det = smoe_opt::moe::detect(&model.graph);
    let calib = |outputs: bool| {
        let opts = smoe_opt::calib::CalibOptions {
            runtime: smoe_opt::calib::Runtime::Tract,
            #[cfg(feature = "ort")]
            ep: Default::default(),
            source: smoe_opt::calib::Source::Npz(dir.join("io.npz")),
            batch: 2,
            stats: smoe_opt::calib::stats::StatsConfig {
                outputs,
                ..Default::default()
            },
            progress: false,
        };
        smoe_opt::calib::calibrate(&model, &det, &opts).unwrap()
    };
    let (all, routed) = (calib(true), calib(false));
    for (a, b) in all.layers.iter().zip(&routed.layers) {
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.reap, b.reap, "REAP from the routed tokens either way");
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.mean_output.nrows(), a.num_experts);
        assert_eq!(b.mean_output.nrows(), 0);
    }
    let opts = |method| smoe_opt::merge::MergeOptions {
        method,
        align: None,
        grouping: None,
        budget: smoe_opt::merge::Budget::Keep(0.5),
        layers: None,
        progress: false,
    };
    use smoe_opt::merge::MergeMethod;
    let a = smoe_opt::merge::plan(&model.graph, &det, &all, &opts(MergeMethod::MSmoe)).unwrap();
    let b = smoe_opt::merge::plan(&model.graph, &det, &routed, &opts(MergeMethod::MSmoe)).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.experts.len(), y.experts.len());
        for (p, q) in x.experts.iter().zip(&y.experts) {
            assert_eq!(p.ids, q.ids, "m-smoe does not read mean outputs");
            assert_eq!(p.ffn, q.ffn);
        }
    }
    let e = smoe_opt::merge::plan(&model.graph, &det, &routed, &opts(MergeMethod::HcSmoe))
        .expect_err("hc-smoe without mean outputs");
    assert!(e.to_string().contains("mean outputs"), "{e}");
}

#[test]
fn routing_only_calibration_serves_merges_and_refuses_reap() {
    // `calibrate --collect routing` runs no expert outside the model: its routing statistics
    // equal those of `--collect all`, an m-smoe merge from either file writes the same bytes,
    // and prune-reap (which needs expert outputs) is refused with what to do.
    let dir = root().join("testdata/models/mixtral_v4_ts");
    let tmp = tempfile::tempdir().unwrap();
    let stats = |collect: &str| -> (std::path::PathBuf, Value) {
        let out = tmp.path().join(format!("{collect}.json"));
        let o = bin()
            .arg("calibrate")
            .arg(dir.join("model.onnx"))
            .arg("--calib")
            .arg(dir.join("io.npz"))
            .args(["--collect", collect, "-q", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = fitting_file(Schema::Stats, &out);
        (out, v)
    };
    let ((all_path, all), (routing_path, routing)) = (stats("all"), stats("routing"));
    let layers = |v: &Value| v["layers"].as_array().unwrap().clone();
    for (a, r) in layers(&all).iter().zip(&layers(&routing)) {
        for key in [
            "tokens",
            "counts",
            "frequency",
            "mean_weight",
            "logit_cosine",
        ] {
            assert_eq!(a[key], r[key], "{key}");
        }
        assert_eq!(a["reap"].as_array().unwrap().len(), 8);
        assert_eq!(r["reap"], serde_json::json!([]));
    }
    let merged = |stats: &std::path::Path, name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = bin()
            .arg(dir.join("model.onnx"))
            .arg("-o")
            .arg(&out)
            .arg("--stats")
            .arg(stats)
            .args(["--eval-data"])
            .arg(dir.join("io.npz"))
            .args(["-q"])
            .args(extra)
            .output()
            .unwrap();
        (o, out)
    };
    let (oa, a) = merged(&all_path, "a.onnx", &["--keep", "0.5"]);
    let (or, r) = merged(&routing_path, "r.onnx", &["--keep", "0.5"]);
    assert!(oa.status.success() && or.status.success());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&r).unwrap());
    let (o, out) = merged(
        &routing_path,
        "reap.onnx",
        &["--method", "prune-reap", "--experts", "4"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("REAP") && err.contains("--collect all"),
        "{err}"
    );
    assert!(!out.exists());
}

//! MoE detection on every committed model, against the generator's ground truth
//! (testdata/models/*/truth.json) — never against the detector's own output — and the
//! extracted descriptions confirmed numerically against onnxruntime by an independent
//! numpy implementation of the block semantics (tests/py/check_blocks.py).
mod common;
use common::*;
use serde_json::Value;
use smoe_opt::Model;

fn truth(dir: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("truth.json")).unwrap()).unwrap()
}

#[test]
fn detection_matches_generator_truth() {
    for (name, dir) in models() {
        let t = truth(&dir);
        let o = bin()
            .arg("inspect")
            .arg(dir.join("model.onnx"))
            .arg("--json")
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}");
        let got: Value = fitting(Schema::Inspect, &o.stdout);
        let blocks = got["moe_blocks"].as_array().unwrap();
        let layers = t["layers"].as_array().unwrap();
        assert_eq!(blocks.len(), layers.len(), "{name}: block count");
        let form = match t["form"].as_str().unwrap() {
            "per-expert" | "per-expert-3d" => "per-expert",
            "batched-3d" => "batched3d",
            "ort-fused" => "ort-fused",
            "dense-all" => "dense-all",
            "dense" => "none",
            f => panic!("{name}: unknown truth form {f}"),
        };
        for (b, l) in blocks.iter().zip(layers) {
            let ctx = format!("{name} {}", b["name"]);
            assert_eq!(b["form"], form, "{ctx}");
            for key in [
                "experts",
                "top_k",
                "hidden",
                "intermediate",
                "activation",
                "renormalize",
            ] {
                assert_eq!(b[key], l[key], "{ctx}: {key}");
            }
            assert_eq!(b["router_scoring"], l["router_scoring"], "{ctx}");
            assert_eq!(b["shared_experts"], l["shared_experts"], "{ctx}");
            assert_eq!(
                b["capacity"],
                l.get("capacity").cloned().unwrap_or(Value::Null),
                "{ctx}"
            );
            if let Some(p) = l.get("activation_params") {
                for key in ["alpha", "beta", "limit"] {
                    let (got, want) = (&b["activation_params"][key], &p[key]);
                    assert!(
                        (got.as_f64().unwrap() - want.as_f64().unwrap()).abs() < 1e-6,
                        "{ctx}: activation {key}: {got} != {want}"
                    );
                }
            } else {
                assert!(b.get("activation_params").is_none(), "{ctx}");
            }
            let dtype = match t["precision"].as_str() {
                Some("fp16") => "float16",
                _ => "float",
            };
            assert_eq!(b["dtype"], dtype, "{ctx}: dtype");
            for key in ["expert_biases", "router_bias", "selection_bias"] {
                let want = l.get(key).cloned().unwrap_or(Value::Bool(false));
                assert_eq!(b[key], want, "{ctx}: {key}");
            }
            match l.get("sparsemixer_eps").and_then(Value::as_f64) {
                Some(e) => assert!(
                    (b["sparsemixer_eps"].as_f64().unwrap_or(-1.0) - e).abs() < 1e-6,
                    "{ctx}: sparsemixer eps {}",
                    b["sparsemixer_eps"]
                ),
                None => assert!(b["sparsemixer_eps"].is_null(), "{ctx}"),
            }
            let quant = l.get("quantization").cloned().unwrap_or(Value::Null);
            assert_eq!(b["quantization"], quant, "{ctx}: quantization");
            let groups = l.get("groups").cloned().unwrap_or(Value::Null);
            assert_eq!(b["groups"], groups, "{ctx}: groups");
            let scaling = l
                .get("routed_scaling")
                .and_then(Value::as_f64)
                .unwrap_or(1.0);
            assert_eq!(
                b["routed_scaling"].as_f64(),
                Some(scaling),
                "{ctx}: scaling"
            );
            let truth_present = l["experts_present"].as_array().unwrap();
            if b["experts_identified"] == true {
                assert_eq!(&b["experts_present"], &l["experts_present"], "{ctx}");
            } else {
                assert_eq!(
                    b["experts_present"].as_array().unwrap().len(),
                    truth_present.len(),
                    "{ctx}"
                );
            }
        }
        let diags: Vec<String> = got["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        let missing = layers.iter().any(|l| {
            l["experts_present"].as_array().unwrap().len() < l["experts"].as_u64().unwrap() as usize
        });
        assert_eq!(
            diags.iter().any(|d| d.contains("graph holds only")),
            missing,
            "{name}: {diags:?}"
        );
        let baked = t["patched_loop"] == false;
        assert_eq!(
            diags.iter().any(|d| d.contains("baked in at export")),
            baked,
            "{name}: {diags:?}"
        );
        if !missing && !baked {
            assert!(diags.is_empty(), "{name}: unexpected diagnostics {diags:?}");
        }
    }
}

#[test]
fn detected_blocks_compute_what_the_model_computes() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (name, dir) in models() {
        let model = Model::load(dir.join("model.onnx")).unwrap();
        let det = smoe_opt::moe::detect(&model.graph);
        let blocks = det.identified_blocks();
        if blocks.is_empty() {
            continue;
        }
        let path = tmp.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(&blocks).unwrap()).unwrap();
        let r = run_py(
            &py,
            "check_blocks.py",
            &[
                dir.join("model.onnx").to_str().unwrap(),
                path.to_str().unwrap(),
                dir.join("io.npz").to_str().unwrap(),
                "--rtol",
                ref_rtol(&dir),
            ],
        );
        assert!(
            r.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
}

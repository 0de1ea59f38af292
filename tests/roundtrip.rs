//! Exact ONNX I/O: byte-identical round trips, external data both ways, and the written
//! models checked by onnx.checker and onnxruntime (independent of this crate).
mod common;
use common::*;
use smoe_opt::onnx::SaveOptions;
use smoe_opt::Model;

#[test]
fn inline_models_round_trip_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, dir) in models() {
        if name.ends_with("_ext") {
            continue;
        }
        let input = dir.join("model.onnx");
        let out = tmp.path().join(format!("{name}.onnx"));
        let m = Model::load(&input).unwrap();
        m.graph.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
        if !m.external_files().is_empty() {
            // Saved inline its bytes differ by construction; external data round trips are
            // the next tests'.
            continue;
        }
        let s = m.save(&out, &SaveOptions::default()).unwrap();
        assert!(s.data_path.is_none());
        assert!(
            std::fs::read(&input).unwrap() == std::fs::read(&out).unwrap(),
            "{name} changed"
        );
    }
}

#[test]
fn external_model_reinlines_to_the_original_bytes() {
    // mixtral_v4_ts_ext is mixtral_v4_ts saved by onnx.save(save_as_external_data=True).
    let root = root().join("testdata/models");
    let m = Model::load(root.join("mixtral_v4_ts_ext/model.onnx")).unwrap();
    assert_eq!(m.external_files().len(), 1);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("inline.onnx");
    m.save(&out, &SaveOptions::default()).unwrap();
    assert_eq!(
        std::fs::read(root.join("mixtral_v4_ts/model.onnx")).unwrap(),
        std::fs::read(&out).unwrap()
    );
}

#[test]
fn external_data_save_and_reload_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["mixtral_v4_ts", "ort_moe_swiglu", "mixtral_v5_dynamo"] {
        let src = root().join("testdata/models").join(name).join("model.onnx");
        let ext = tmp.path().join(format!("{name}.onnx"));
        let m = Model::load(&src).unwrap();
        let opts = SaveOptions {
            external_data: true,
            ..Default::default()
        };
        let s = m.save(&ext, &opts).unwrap();
        let data = s.data_path.clone().expect("external data file");
        assert_eq!(data, tmp.path().join(format!("{name}.onnx.data")));
        assert_eq!(std::fs::metadata(&data).unwrap().len(), s.data_bytes);
        // Every large tensor is aligned in the data file.
        let reloaded = Model::load(&ext).unwrap();
        for init in reloaded.graph.initializers() {
            let inline = init.proto.raw_data.as_ref().map_or(0, |r| r.len());
            assert!(
                inline < 1024,
                "{name}: {} left inline ({inline} bytes)",
                init.name()
            );
            if let Ok(r) = smoe_opt::onnx::external::parse_ref(&init.proto) {
                let align = if r.length.unwrap() >= 1 << 20 {
                    4096
                } else {
                    64
                };
                assert_eq!(r.offset % align, 0, "{name}: {} misaligned", init.name());
            }
        }
        let back = tmp.path().join(format!("{name}.inline.onnx"));
        reloaded.save(&back, &SaveOptions::default()).unwrap();
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(&back).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn written_models_pass_checker_and_run_in_onnxruntime() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (name, dir) in models() {
        for external in [false, true] {
            let out = tmp.path().join(format!("{name}-{external}.onnx"));
            let mut cmd = bin();
            cmd.arg(dir.join("model.onnx"))
                .arg("-o")
                .arg(&out)
                .arg("-q");
            if external {
                cmd.arg("--external-data");
            }
            let o = cmd.output().unwrap();
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(out.with_extension("onnx.data").exists(), external, "{name}");
            let io = dir.join("io.npz");
            let orig = dir.join("model.onnx");
            let args = [
                out.to_str().unwrap(),
                io.to_str().unwrap(),
                "--rtol",
                "0",
                "--original",
                orig.to_str().unwrap(),
            ];
            let r = run_py(&py, "check_model.py", &args);
            assert!(
                r.status.success(),
                "{name} (external={external}): {}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
    }
}

#[test]
fn output_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("testdata/models/qwen2moe_v4_ts/model.onnx");
    let mut outs = vec![];
    for i in 0..2 {
        let dir = tmp.path().join(i.to_string());
        std::fs::create_dir(&dir).unwrap();
        let out = dir.join("model.onnx");
        let o = bin()
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .arg("--external-data")
            .output()
            .unwrap();
        assert!(o.status.success());
        outs.push((
            std::fs::read(&out).unwrap(),
            std::fs::read(dir.join("model.onnx.data")).unwrap(),
        ));
    }
    assert!(outs[0] == outs[1], "two runs wrote different bytes");
}

#[test]
fn models_over_the_inline_limit_go_external_automatically() {
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("testdata/models/olmoe_v4_ts/model.onnx");
    let m = Model::load(&src).unwrap();
    let out = tmp.path().join("big.onnx");
    let opts = SaveOptions {
        inline_limit: Some(100_000),
        ..Default::default()
    };
    let s = m.save(&out, &opts).unwrap();
    assert_eq!(
        s.data_path.as_deref(),
        Some(tmp.path().join("big.onnx.data").as_path())
    );
    let back = tmp.path().join("back.onnx");
    Model::load(&out)
        .unwrap()
        .save(&back, &SaveOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
}

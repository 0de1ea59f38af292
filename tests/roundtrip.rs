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
        // Named after the model and its bytes' hash; the model refers to it.
        let fname = data.file_name().unwrap().to_string_lossy().into_owned();
        let hash = fname
            .strip_prefix(&format!("{name}.onnx."))
            .and_then(|r| r.strip_suffix(".data"))
            .unwrap_or_else(|| panic!("{fname}"));
        assert!(
            hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{fname}"
        );
        assert_eq!(common::data_file(&ext), Some(data.clone()));
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
            assert_eq!(common::data_file(&out).is_some(), external, "{name}");
            let io = dir.join("io.npz");
            let orig = dir.join("model.onnx");
            // Bit for bit against the original in the same onnxruntime; within the reference
            // tolerance of the exporter's outputs (made on another CPU, whose kernels may
            // round the last bits differently).
            let args = [
                out.to_str().unwrap(),
                io.to_str().unwrap(),
                "--rtol",
                ref_rtol(&dir),
                "--original",
                orig.to_str().unwrap(),
                "--exact",
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
        outs.push(common::model_and_data(&out));
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
    assert_eq!(s.data_path, common::data_file(&out));
    assert!(s.data_path.is_some());
    let back = tmp.path().join("back.onnx");
    Model::load(&out)
        .unwrap()
        .save(&back, &SaveOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
}

#[test]
fn rewriting_an_output_removes_the_data_files_it_replaced() {
    // out.onnx written with external data three times (two models, then inline): each write
    // leaves exactly the new model and the data it names; data files of the replaced model
    // and orphans of interrupted writes to that name go, other files stay, and so do data
    // files the input model reads even when they carry the output's name.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ext = SaveOptions {
        external_data: true,
        ..Default::default()
    };
    let a = Model::load(root().join("testdata/models/mixtral_v4_ts/model.onnx")).unwrap();
    let b = Model::load(root().join("testdata/models/ort_moe_swiglu/model.onnx")).unwrap();
    let out = dir.join("out.onnx");
    std::fs::write(dir.join("other.data"), b"not ours").unwrap();
    let orphan = dir.join("out.onnx.0123456789abcdef.data");
    std::fs::write(&orphan, b"an interrupted write's data").unwrap();
    let sa = a.save(&out, &ext).unwrap();
    let da = sa.data_path.clone().unwrap();
    assert!(!orphan.exists());
    assert_eq!(
        listing(dir),
        [
            "other.data",
            "out.onnx",
            da.file_name().unwrap().to_str().unwrap()
        ]
    );
    // The same model again: the same name and bytes.
    assert_eq!(a.save(&out, &ext).unwrap().data_path, Some(da.clone()));
    let sb = b.save(&out, &ext).unwrap();
    let db = sb.data_path.clone().unwrap();
    assert_ne!(da, db);
    assert!(!da.exists() && db.exists());
    assert_eq!(common::data_file(&out), Some(db.clone()));
    // A legacy `out.onnx.data` the replaced model names is removed too.
    let legacy = dir.join("legacy");
    std::fs::create_dir(&legacy).unwrap();
    let reload = Model::load(root().join("testdata/models/mixtral_v4_ts_ext/model.onnx")).unwrap();
    let lout = legacy.join("model.onnx");
    for f in ["model.onnx", "model.onnx.data"] {
        std::fs::copy(
            root().join("testdata/models/mixtral_v4_ts_ext").join(f),
            legacy.join(f),
        )
        .unwrap();
    }
    reload.save(&lout, &SaveOptions::default()).unwrap();
    assert_eq!(listing(&legacy), ["model.onnx"]);
    // Inline over the external pair: the data file goes.
    Model::load(&out)
        .unwrap()
        .save(&dir.join("copy.onnx"), &ext)
        .unwrap();
    b.save(&out, &SaveOptions::default()).unwrap();
    assert!(!db.exists());
    assert_eq!(common::data_file(&out), None);
    // An input reading `copy.onnx.<hash>.data` keeps it when copy.onnx is rewritten from it.
    let copy = dir.join("copy.onnx");
    let input_data = common::data_file(&copy).unwrap();
    let moved = dir.join("input.onnx");
    std::fs::rename(&copy, &moved).unwrap();
    let input = Model::load(&moved).unwrap();
    input.save(&copy, &SaveOptions::default()).unwrap();
    assert!(input_data.exists(), "the input's data was removed");
    drop(input);
    assert_eq!(
        listing(dir),
        [
            "copy.onnx",
            input_data.file_name().unwrap().to_str().unwrap(),
            "input.onnx",
            "legacy",
            "other.data",
            "out.onnx"
        ]
    );
}

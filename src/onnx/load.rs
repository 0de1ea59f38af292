//! Reading ONNX files: memory-mapped protobuf decode, structural checks, external data.
use super::external::ExternalStore;
use super::proto::{ModelProto, TensorProto};
use super::tensor::{declared_bytes, inline_bytes, is_external, tensor_name};
use super::walk::{graph_tensors_mut, nodes_tensors_mut};
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::model::Model;
use bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::path::Path;

impl Model {
    /// Loads a model file. The file and any external data are memory-mapped; tensor
    /// data is not copied. Every external reference is validated (path inside the
    /// model's folder, sizes within the file) and every inline tensor's size checked.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(decode_err(path, "is a directory"));
        }
        let f = crate::inputs::open_regular(path)?;
        if meta.len() == 0 {
            return Err(decode_err(path, "the file is empty"));
        }
        // SAFETY: read-only map of a file we never write; see ExternalStore::map.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let bytes = Bytes::from_owner(map);
        let proto = ModelProto::decode(bytes).map_err(|e| {
            decode_err(
                path,
                &format!(
                    "protobuf decode failed ({e}); the file is truncated or not an ONNX model"
                ),
            )
        })?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Model::from_proto(proto, dir, Some(path))
    }

    /// Builds a model from a decoded proto; external data is resolved relative to `dir`.
    pub fn from_proto(mut proto: ModelProto, dir: &Path, path: Option<&Path>) -> Result<Model> {
        let shown = path.unwrap_or(Path::new("<memory>"));
        let ir = proto
            .ir_version
            .ok_or_else(|| decode_err(shown, "no ir_version: not an ONNX model"))?;
        if !(1..=64).contains(&ir) {
            return Err(decode_err(shown, &format!("implausible ir_version {ir}")));
        }
        let mut graph = proto
            .graph
            .take()
            .ok_or_else(|| decode_err(shown, "the model has no graph"))?;
        if ir >= 3 && proto.opset_import.is_empty() {
            return Err(decode_err(shown, "no opset_import"));
        }
        let mut store = ExternalStore::new(dir);
        if let Some(p) = path {
            store = store.forbid(p);
        }
        let mut external = HashMap::new();
        for t in &graph.initializer {
            if is_external(t) {
                external.insert(t.name.clone().unwrap_or_default(), store.resolve(shown, t)?);
            }
        }
        let mut check = |t: &mut TensorProto| -> Result<()> {
            if is_external(t) {
                store.resolve(shown, t).map(|_| ())
            } else {
                check_inline(shown, t)
            }
        };
        graph_tensors_mut(&mut graph, &mut check)?;
        for f in &mut proto.functions {
            nodes_tensors_mut(&mut f.node, &mut check)?;
        }
        for ti in &mut proto.training_info {
            for g in [ti.initialization.as_mut(), ti.algorithm.as_mut()]
                .into_iter()
                .flatten()
            {
                graph_tensors_mut(g, &mut check)?;
            }
        }
        let graph =
            Graph::from_proto(graph, external).map_err(|e| decode_err(shown, &e.to_string()))?;
        Ok(Model {
            proto,
            graph,
            path: path.map(Path::to_path_buf),
            external: store,
            spill: Default::default(),
        })
    }
}

fn check_inline(path: &Path, t: &TensorProto) -> Result<()> {
    let wrap = |e: Error| decode_err(path, &e.to_string());
    match (&t.raw_data, declared_bytes(t).map_err(wrap)?) {
        (Some(raw), Some(expected)) if raw.len() as u64 != expected => Err(decode_err(
            path,
            &format!(
                "tensor '{}': dims {:?} need {expected} bytes, raw_data has {}",
                tensor_name(t),
                t.dims,
                raw.len()
            ),
        )),
        (Some(_), _) => Ok(()),
        (None, Some(_)) if super::tensor::typed_supported(t.data_type.unwrap_or(0)) => {
            inline_bytes(t).map(|_| ()).map_err(wrap)
        }
        _ => Ok(()),
    }
}

fn decode_err(path: &Path, reason: &str) -> Error {
    Error::Decode {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

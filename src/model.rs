//! A loaded ONNX model: the model-level proto fields, the main graph as IR, and the
//! memory-mapped external data it references.
use crate::ir::Graph;
use crate::onnx::proto::{ModelProto, OperatorSetIdProto};
use crate::onnx::{ExternalFile, ExternalStore};
use std::path::{Path, PathBuf};

/// An ONNX model in memory. Weights stay in the (memory-mapped) files they came from
/// until a pass replaces them.
#[derive(Debug, Clone)]
pub struct Model {
    /// Every model-level field except `graph` (opsets, metadata, functions, …), verbatim.
    pub(crate) proto: ModelProto,
    /// The main graph.
    pub graph: Graph,
    pub(crate) path: Option<PathBuf>,
    pub(crate) external: ExternalStore,
    /// Where rewritten weights were moved out of memory ([`Model::spill`]).
    pub(crate) spill: crate::onnx::spill::Spill,
}

impl Model {
    /// The file this model was loaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// IR version declared by the file.
    pub fn ir_version(&self) -> i64 {
        self.proto.ir_version.unwrap_or(0)
    }

    /// Opset imports.
    pub fn opsets(&self) -> &[OperatorSetIdProto] {
        &self.proto.opset_import
    }

    /// Version of the default ONNX domain's opset (0 when absent).
    pub fn default_opset(&self) -> i64 {
        self.proto
            .opset_import
            .iter()
            .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
            .and_then(|o| o.version)
            .unwrap_or(0)
    }

    /// `producer_name producer_version`.
    pub fn producer(&self) -> String {
        let n = self.proto.producer_name.as_deref().unwrap_or("");
        let v = self.proto.producer_version.as_deref().unwrap_or("");
        format!("{n} {v}").trim().to_string()
    }

    /// Adds an opset import for `domain` unless the model has one.
    pub fn import_opset(&mut self, domain: &str, version: i64) {
        if !self
            .proto
            .opset_import
            .iter()
            .any(|o| o.domain.as_deref().unwrap_or("") == domain)
        {
            self.proto.opset_import.push(OperatorSetIdProto {
                domain: Some(domain.to_string()),
                version: Some(version),
            });
        }
    }

    /// The model-level proto without its graph.
    pub fn header(&self) -> &ModelProto {
        &self.proto
    }

    /// External data files referenced by the model.
    pub fn external_files(&self) -> Vec<ExternalFile> {
        self.external.files()
    }

    /// The model encoded as one protobuf in which the tensors stored in this model's own
    /// external data files stay references to them (each validated and mapped as
    /// [`ExternalStore::resolve`] does), every other tensor inline; with the folder those
    /// references are relative to. A runtime that reads external data itself (onnxruntime
    /// maps it) then loads a model of any size without a copy of its weights. The folder is
    /// `None` when nothing stays a reference. Fails when what stays inline exceeds the
    /// 2 GiB protobuf limit.
    pub fn to_bytes_referencing(&self) -> crate::Result<(Vec<u8>, Option<PathBuf>)> {
        let (bytes, referenced) = self.encode(self.path.is_some())?;
        Ok((bytes, referenced.then(|| self.external.dir().to_path_buf())))
    }

    /// Size of what [`Model::to_bytes_referencing`] would produce, without materialising it.
    pub fn referencing_len(&self) -> u64 {
        use prost::Message;
        self.to_proto().encoded_len() as u64
    }

    /// The whole model encoded as one protobuf with all tensor data inline (for runtimes
    /// loading from memory). Fails above the 2 GiB protobuf limit.
    pub fn to_inline_bytes(&self) -> crate::Result<Vec<u8>> {
        Ok(self.encode(false)?.0)
    }

    /// The model as one protobuf: each external tensor validated and mapped, then left a
    /// reference (`references`) or copied inline; with whether any stayed a reference.
    fn encode(&self, references: bool) -> crate::Result<(Vec<u8>, bool)> {
        use prost::Message;
        let mut p = self.to_proto();
        let path = self.path.clone().unwrap_or_default();
        let mut store = self.external.clone();
        let mut referenced = false;
        let mut each = |t: &mut crate::onnx::proto::TensorProto| -> crate::Result<()> {
            if crate::onnx::tensor::is_external(t) {
                let data = store.resolve(&path, t)?;
                if references {
                    referenced = true;
                } else {
                    t.raw_data = Some(data);
                    t.data_location = None;
                    t.external_data.clear();
                }
            }
            Ok(())
        };
        crate::onnx::walk::model_tensors_mut(&mut p, &mut each)?;
        if p.encoded_len() as u64 > crate::onnx::PROTOBUF_LIMIT {
            return Err(crate::Error::Usage(if references {
                "the model's inline tensors exceed 2 GiB and cannot be passed in memory".into()
            } else {
                "the model exceeds 2 GiB and cannot be passed inline".into()
            }));
        }
        Ok((p.encode_to_vec(), referenced))
    }

    /// Size of the model as one protobuf with all tensor data inline (what
    /// [`Model::to_inline_bytes`] would produce), without materialising it.
    pub fn inline_len(&self) -> u64 {
        use prost::Message;
        let external: u64 = self
            .graph
            .initializers()
            .filter(|i| crate::onnx::tensor::is_external(&i.proto))
            .map(|i| {
                crate::onnx::tensor::declared_bytes(&i.proto)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
                    + 16
            })
            .sum();
        self.to_proto().encoded_len() as u64 + external
    }

    /// This model's headers and external data with another main graph (a part of this one).
    pub fn with_graph(&self, graph: Graph) -> Model {
        Model {
            proto: self.proto.clone(),
            graph,
            path: self.path.clone(),
            external: self.external.clone(),
            spill: self.spill.clone(),
        }
    }

    /// Drops the pages of the model's mapped external data and spilled weights from the
    /// resident set (see [`ExternalStore::release`]).
    pub fn release_mapped(&self) {
        self.external.release();
        self.spill.release();
    }

    /// Moves the weights that passes wrote into this model (inline, on the heap) to a
    /// temporary file, mapped: what a layer-by-layer rewrite of a model larger than memory
    /// calls after each layer. Returns the bytes moved.
    pub fn spill(&mut self) -> crate::Result<u64> {
        let s = self.spill.clone();
        s.take(self)
    }

    /// The whole model as a proto (external tensors still reference their files).
    pub fn to_proto(&self) -> ModelProto {
        let mut p = self.proto.clone();
        p.graph = Some(self.graph.to_proto());
        p
    }
}

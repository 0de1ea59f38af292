//! Writing ONNX files: inline below the 2 GiB protobuf limit, or one aligned external
//! data file beside the output. Output is written to temporary files and renamed, so a
//! failure leaves no partial output.
use super::proto::tensor_proto::DataLocation;
use super::proto::{StringStringEntryProto, TensorProto};
use super::tensor::{inline_bytes, is_external};
use crate::error::{Error, Result};
use crate::fsutil::{same_file, AtomicFile};
use crate::model::Model;
use bytes::Bytes;
use prost::Message;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Largest protobuf a reader accepts (2 GiB − 1).
pub const PROTOBUF_LIMIT: u64 = i32::MAX as u64;
/// Tensors this large or larger go to the external file in external mode.
pub const EXTERNAL_THRESHOLD: usize = 1024;
/// Alignment of large tensors in the external file (page size, so they can be mapped).
pub const PAGE_ALIGN: u64 = 4096;
/// Tensors at least this large are page-aligned; smaller ones are 64-byte aligned.
pub const PAGE_ALIGN_THRESHOLD: u64 = 1 << 20;

/// How to write a model.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Always write tensor data to an external file (`<output>.data`).
    pub external_data: bool,
    /// Show a progress bar while writing external data.
    pub progress: bool,
    /// Size above which data goes external automatically; `None` = the 2 GiB protobuf
    /// limit. (Lowered by tests to exercise the large-model path on small files.)
    pub inline_limit: Option<u64>,
}

/// What [`Model::save`] wrote.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct SaveSummary {
    /// The model file.
    pub model_path: PathBuf,
    /// Its size in bytes.
    pub model_bytes: u64,
    /// The external data file, when one was written.
    pub data_path: Option<PathBuf>,
    /// Its size in bytes.
    pub data_bytes: u64,
}

impl SaveSummary {
    /// Bytes on disk, model plus data.
    pub fn total_bytes(&self) -> u64 {
        self.model_bytes + self.data_bytes
    }
}

/// Bytes copied between two releases of the mapped pages read.
const RELEASE_EVERY: u64 = 256 << 20;

impl Model {
    /// Writes the model to `out`. Refuses to overwrite the model's own file or any
    /// external data file it reads from.
    pub fn save(&self, out: &Path, opts: &SaveOptions) -> Result<SaveSummary> {
        let refuse = |reason: String| Error::Write {
            path: out.to_path_buf(),
            reason,
        };
        if let Some(src) = self.path() {
            if same_file(src, out) {
                return Err(refuse(
                    "the output is the input file; choose another output path".into(),
                ));
            }
        }
        if self.external.maps(out) {
            return Err(refuse(
                "the output is one of the input's external data files".into(),
            ));
        }
        let mut proto = self.to_proto();
        let external_bytes: u64 = self.external.files().iter().map(|f| f.bytes).sum();
        let estimate = proto.encoded_len() as u64 + external_bytes;
        let limit = opts
            .inline_limit
            .unwrap_or(PROTOBUF_LIMIT)
            .min(PROTOBUF_LIMIT);
        let external = opts.external_data || estimate > limit;
        if external && !opts.external_data {
            log::info!("model is ~{estimate} bytes, over the {limit}-byte inline limit: writing external data");
        }
        if !external {
            let path = self.path.clone().unwrap_or_default();
            let mut store = self.external.clone();
            let mut inline = |t: &mut TensorProto| -> Result<()> {
                if is_external(t) {
                    let b = store.resolve(&path, t)?;
                    t.raw_data = Some(b);
                    t.data_location = None;
                    t.external_data.clear();
                }
                Ok(())
            };
            visit_all(&mut proto, &mut inline)?;
            let encoded = proto.encode_to_vec();
            if encoded.len() as u64 > PROTOBUF_LIMIT {
                return Err(refuse(
                    "the model exceeds 2 GiB; use --external-data".into(),
                ));
            }
            let mut f = AtomicFile::create(out)?;
            f.file()
                .write_all(&encoded)
                .map_err(|e| Error::io(out, e))?;
            f.commit()?;
            return Ok(SaveSummary {
                model_path: out.to_path_buf(),
                model_bytes: encoded.len() as u64,
                data_path: None,
                data_bytes: 0,
            });
        }
        self.save_external(out, proto, opts)
    }

    fn save_external(
        &self,
        out: &Path,
        mut proto: super::proto::ModelProto,
        opts: &SaveOptions,
    ) -> Result<SaveSummary> {
        let file_name = out
            .file_name()
            .ok_or_else(|| Error::Usage(format!("{}: not a file path", out.display())))?
            .to_string_lossy()
            .into_owned();
        let location = format!("{file_name}.data");
        let data_path = crate::fsutil::parent_dir(out).join(&location);
        if self.external.maps(&data_path) || self.path().is_some_and(|p| same_file(p, &data_path)) {
            return Err(Error::Write {
                path: data_path,
                reason: "would overwrite a file the input model reads; choose another output name"
                    .into(),
            });
        }
        let mut data = AtomicFile::create(&data_path)?;
        let src_path = self.path.clone().unwrap_or_default();
        let mut store = self.external.clone();
        let total: u64 =
            self.external.files().iter().map(|f| f.bytes).sum::<u64>() + proto.encoded_len() as u64;
        let bar = crate::progress::bytes_bar(opts.progress, total, "writing data");
        let data_err = |e: std::io::Error| Error::io(&data_path, e);
        let mut w = BufWriter::with_capacity(8 << 20, data.file().try_clone().map_err(data_err)?);
        let mut offset = 0u64;
        let mut since_release = 0u64;
        let mut write_tensor = |t: &mut TensorProto| -> Result<()> {
            let bytes: Bytes = if is_external(t) {
                store.resolve(&src_path, t)?
            } else if t
                .raw_data
                .as_ref()
                .is_some_and(|r| r.len() >= EXTERNAL_THRESHOLD)
            {
                inline_bytes(t)?
            } else {
                return Ok(());
            };
            let len = bytes.len() as u64;
            let align = if len >= PAGE_ALIGN_THRESHOLD {
                PAGE_ALIGN
            } else {
                64
            };
            let pad = offset.next_multiple_of(align) - offset;
            w.write_all(&vec![0u8; pad as usize]).map_err(data_err)?;
            offset += pad;
            w.write_all(&bytes).map_err(data_err)?;
            bar.inc(len);
            // Mapped weights read for the copy leave the resident set now and then (a model
            // larger than memory is copied without holding it).
            since_release += len;
            if since_release >= RELEASE_EVERY {
                since_release = 0;
                self.release_mapped();
            }
            let kv = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.to_string()),
                value: Some(v),
            };
            t.external_data = vec![
                kv("location", location.clone()),
                kv("offset", offset.to_string()),
                kv("length", len.to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            t.raw_data = None;
            offset += len;
            Ok(())
        };
        visit_all(&mut proto, &mut write_tensor)?;
        w.flush().map_err(data_err)?;
        drop(w);
        bar.finish_and_clear();
        let encoded = proto.encode_to_vec();
        let mut model = AtomicFile::create(out)?;
        model
            .file()
            .write_all(&encoded)
            .map_err(|e| Error::io(out, e))?;
        // An old model left beside the new data would load silently with wrong weights if
        // the process died between the two renames: it is removed first, so a kill there
        // leaves no model (an error at load), never a mismatched pair.
        if out.exists() {
            std::fs::remove_file(out).map_err(|e| Error::io(out, e))?;
        }
        data.commit()?;
        if let Err(e) = model.commit() {
            let _ = std::fs::remove_file(&data_path);
            return Err(e);
        }
        Ok(SaveSummary {
            model_path: out.to_path_buf(),
            model_bytes: encoded.len() as u64,
            data_path: Some(data_path),
            data_bytes: offset,
        })
    }
}

fn visit_all(
    proto: &mut super::proto::ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    super::walk::model_tensors_mut(proto, f)
}

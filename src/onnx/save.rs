//! Writing ONNX files: inline below the 2 GiB protobuf limit, or one aligned external
//! data file beside the output, named after the model and a hash of its bytes
//! (`out.onnx.<hash>.data`). Output is written to temporary files and renamed, the model
//! last, so a failure or a kill leaves no partial output and never pairs a model with data
//! it was not written with.
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
use xxhash_rust::xxh3::Xxh3;

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
    /// Always write tensor data to an external file (`<output>.<hash>.data`).
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
            let file_name = out.file_name().unwrap_or_default().to_string_lossy();
            let old_data = referenced_data(out, &file_name);
            f.commit()?;
            self.remove_stale_data(crate::fsutil::parent_dir(out), &file_name, "", &old_data);
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
        let folder = crate::fsutil::parent_dir(out);
        // The data is written under a temporary name; its final name carries a hash of its
        // bytes, known once they are written (the tensors' locations are set then).
        let mut data = AtomicFile::create(&folder.join(format!("{file_name}.data")))?;
        let tmp_path = data.path().to_path_buf();
        let src_path = self.path.clone().unwrap_or_default();
        let mut store = self.external.clone();
        let total: u64 =
            self.external.files().iter().map(|f| f.bytes).sum::<u64>() + proto.encoded_len() as u64;
        let bar = crate::progress::bytes_bar(opts.progress, total, "writing data");
        let data_err = |e: std::io::Error| Error::io(&tmp_path, e);
        let file = data.file().try_clone().map_err(data_err)?;
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(8 << 20, file),
            hash: Xxh3::new(),
        };
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
            t.external_data = vec![
                kv("location", String::new()),
                kv("offset", offset.to_string()),
                kv("length", len.to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            t.raw_data = None;
            offset += len;
            Ok(())
        };
        visit_all(&mut proto, &mut write_tensor)?;
        w.inner.flush().map_err(data_err)?;
        let digest = w.hash.digest();
        drop(w);
        bar.finish_and_clear();
        let location = data_file_name(&file_name, digest);
        let data_path = folder.join(&location);
        if self.external.maps(&data_path) || self.path().is_some_and(|p| same_file(p, &data_path)) {
            return Err(Error::Write {
                path: data_path,
                reason: "would overwrite a file the input model reads; choose another output name"
                    .into(),
            });
        }
        visit_all(&mut proto, &mut |t: &mut TensorProto| {
            for e in &mut t.external_data {
                if e.key.as_deref() == Some("location") {
                    e.value = Some(location.clone());
                }
            }
            Ok(())
        })?;
        let encoded = proto.encode_to_vec();
        let mut model = AtomicFile::create(out)?;
        model
            .file()
            .write_all(&encoded)
            .map_err(|e| Error::io(out, e))?;
        // The data goes under its own new name, beside whatever model and data are there;
        // renaming the model then switches from the old pair to the new one at once, so an
        // interrupted write leaves the old model with its data or the new one with its.
        // (Same name, same bytes: an old model referring to it reads what it was written
        // with.)
        let old_data = referenced_data(out, &file_name);
        data.commit_as(&data_path)?;
        if let Err(e) = model.commit() {
            if !old_data.contains(&data_path) {
                let _ = std::fs::remove_file(&data_path);
            }
            return Err(e);
        }
        self.remove_stale_data(folder, &file_name, &location, &old_data);
        Ok(SaveSummary {
            model_path: out.to_path_buf(),
            model_bytes: encoded.len() as u64,
            data_path: Some(data_path),
            data_bytes: offset,
        })
    }

    /// Removes the data files of the model just replaced and those of earlier writes to the
    /// same name that were interrupted before their model was renamed: files named
    /// `<model>.<hash>.data`, and the old model's `<model>.data`, except the new one and any
    /// the input model reads. Failures are logged, not errors (the new model is complete).
    fn remove_stale_data(&self, folder: &Path, file_name: &str, keep: &str, old: &[PathBuf]) {
        let legacy = format!("{file_name}.data");
        let mut stale: Vec<PathBuf> = old
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| *n == *legacy))
            .cloned()
            .collect();
        if let Ok(entries) = std::fs::read_dir(folder) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name != keep && is_data_file_name(file_name, &name) {
                    stale.push(folder.join(name));
                }
            }
        }
        for p in stale {
            if self.external.maps(&p) || self.path().is_some_and(|m| same_file(m, &p)) {
                continue;
            }
            match std::fs::remove_file(&p) {
                Ok(()) => log::debug!("removed the replaced data file {}", p.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "could not remove the replaced data file {}: {e}",
                    p.display()
                ),
            }
        }
    }
}

fn kv(k: &str, v: String) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(k.to_string()),
        value: Some(v),
    }
}

/// The external data file's name for model file `model` and data hash `digest`:
/// `<model>.<16 hex digits>.data`.
pub fn data_file_name(model: &str, digest: u64) -> String {
    format!("{model}.{digest:016x}.data")
}

/// Whether `name` is a data file name [`data_file_name`] makes for `model`.
fn is_data_file_name(model: &str, name: &str) -> bool {
    name.strip_prefix(model)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(".data"))
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Largest model file read to find the data files it refers to (a model with external
/// data is small; a larger one holds its weights inline).
const OLD_MODEL_READ_LIMIT: u64 = 64 << 20;

/// The data files in `out`'s folder that the model now at `out` refers to, when it is a
/// readable ONNX file with external data (empty otherwise).
fn referenced_data(out: &Path, file_name: &str) -> Vec<PathBuf> {
    let small = std::fs::symlink_metadata(out)
        .is_ok_and(|m| m.is_file() && m.len() <= OLD_MODEL_READ_LIMIT);
    let Some(mut proto) = small
        .then(|| std::fs::read(out).ok())
        .flatten()
        .and_then(|b| super::proto::ModelProto::decode(b.as_slice()).ok())
    else {
        return Vec::new();
    };
    let folder = crate::fsutil::parent_dir(out);
    let mut found: Vec<PathBuf> = Vec::new();
    let _ = visit_all(&mut proto, &mut |t: &mut TensorProto| {
        for e in &t.external_data {
            if let (Some("location"), Some(loc)) = (e.key.as_deref(), e.value.as_deref()) {
                // Only plain names beside the model, and only ones named after it.
                let plain = !loc.contains('/') && !loc.contains('\\');
                if plain && loc.starts_with(file_name) {
                    let p = folder.join(loc);
                    if !found.contains(&p) {
                        found.push(p);
                    }
                }
            }
        }
        Ok(())
    });
    found
}

/// A writer that hashes what it writes.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Xxh3,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn visit_all(
    proto: &mut super::proto::ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    super::walk::model_tensors_mut(proto, f)
}

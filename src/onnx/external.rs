//! External tensor data: safe resolution of `location` references and memory-mapped access.
//!
//! A reference is accepted only when its `location` is a relative path with no `..`
//! component that, after resolving symlinks, still lies inside the model's folder (the
//! class of path-traversal bugs ONNX itself had). Declared sizes are checked against the
//! file's length before anything is read; files are memory-mapped, never copied.
use super::proto::TensorProto;
use super::tensor::{declared_bytes, is_external, tensor_name};
use crate::error::{Error, Result};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// A parsed `external_data` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    /// Path relative to the model's folder.
    pub location: String,
    /// Byte offset of the tensor's data in the file.
    pub offset: u64,
    /// Byte length, when declared.
    pub length: Option<u64>,
}

/// Parses the key/value list of an external tensor.
pub fn parse_ref(t: &TensorProto) -> std::result::Result<ExternalRef, String> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        let key = kv.key.as_deref().unwrap_or("");
        let value = kv.value.as_deref().unwrap_or("");
        let num = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("'{key}' is not a non-negative integer: '{value}'"))
        };
        match key {
            "location" => location = Some(value.to_string()),
            "offset" => offset = num()?,
            "length" => length = Some(num()?),
            _ => {} // checksum and future keys carry no layout information
        }
    }
    let location = location.ok_or("no 'location' key")?;
    Ok(ExternalRef {
        location,
        offset,
        length,
    })
}

/// Checks that `location` is a plain relative path that cannot leave the model's folder.
pub fn check_location(location: &str) -> std::result::Result<(), String> {
    if location.is_empty() {
        return Err("empty location".into());
    }
    if location.contains('\0') {
        return Err("location contains a NUL byte".into());
    }
    let p = Path::new(location);
    let drive = location.len() >= 2 && location.as_bytes()[1] == b':';
    if p.is_absolute() || location.starts_with(['/', '\\']) || drive {
        return Err(format!("location '{location}' is absolute; only paths relative to the model's folder are allowed"));
    }
    // Windows-written files may use backslashes: treat both separators alike.
    if location.split(['/', '\\']).any(|c| c == "..")
        || p.components().any(|c| matches!(c, Component::ParentDir))
    {
        return Err(format!(
            "location '{location}' escapes the model's folder ('..')"
        ));
    }
    Ok(())
}

/// Memory-mapped external data files of one model, keyed by `location`.
#[derive(Debug, Default, Clone)]
pub struct ExternalStore {
    dir: PathBuf,
    files: BTreeMap<String, MappedFile>,
    /// The model file itself (canonical), which no tensor may name as its data.
    model: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct MappedFile {
    path: PathBuf,
    data: Bytes,
}

/// One external data file as seen by [`ExternalStore::files`].
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ExternalFile {
    /// The `location` string as written in the model.
    pub location: String,
    /// The resolved path.
    pub path: PathBuf,
    /// File size in bytes.
    pub bytes: u64,
}

impl ExternalStore {
    /// A store resolving locations relative to `dir` (the model's folder).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ExternalStore {
            dir: dir.into(),
            files: BTreeMap::new(),
            model: None,
        }
    }

    /// The folder locations are relative to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Refuses references to `model` (the file being loaded) as external data.
    pub fn forbid(mut self, model: &std::path::Path) -> Self {
        self.model = model.canonicalize().ok();
        self
    }

    /// The external files referenced so far.
    pub fn files(&self) -> Vec<ExternalFile> {
        self.files
            .iter()
            .map(|(loc, f)| ExternalFile {
                location: loc.clone(),
                path: f.path.clone(),
                bytes: f.data.len() as u64,
            })
            .collect()
    }

    /// Drops the pages of every mapped file from this process's resident memory (they stay
    /// in the page cache; the next read faults them in again). What a pass over a model
    /// larger than memory calls after each layer, so that the layers it read do not add up
    /// in its resident set.
    pub fn release(&self) {
        for f in self.files.values() {
            if f.data.is_empty() {
                continue;
            }
            // SAFETY: `data` is a whole read-only shared file mapping (page-aligned, its own
            // length). MADV_DONTNEED on such a mapping only unmaps pages: their contents are
            // the file's and come back unchanged on the next access, so no live reference
            // into the mapping sees different bytes. Failure only means the pages stay.
            #[cfg(unix)]
            let _ = unsafe {
                rustix::mm::madvise(
                    f.data.as_ptr() as *mut std::ffi::c_void,
                    f.data.len(),
                    rustix::mm::Advice::LinuxDontNeed,
                )
            };
        }
    }

    /// Whether `path` is one of the files this store maps.
    pub fn maps(&self, path: &Path) -> bool {
        let Ok(c) = path.canonicalize() else {
            return false;
        };
        self.files.values().any(|f| f.path == c)
    }

    /// Validates an external tensor's reference and returns a zero-copy view of its data.
    /// `model` names the model file in errors.
    pub fn resolve(&mut self, model: &Path, t: &TensorProto) -> Result<Bytes> {
        let err = |reason: String| Error::ExternalData {
            path: model.to_path_buf(),
            tensor: tensor_name(t).to_string(),
            reason,
        };
        if !is_external(t) {
            return Err(err("tensor is not stored externally".into()));
        }
        let r = parse_ref(t).map_err(err)?;
        let declared = declared_bytes(t)?;
        let file = self.map(&r.location).map_err(err)?;
        let file_len = file.data.len() as u64;
        let length = match (r.length, declared) {
            (Some(l), Some(d)) if l != d => {
                return Err(err(format!(
                    "length {l} disagrees with dims {:?} ({d} bytes)",
                    t.dims
                )))
            }
            (Some(l), _) => l,
            (None, Some(d)) => d,
            (None, None) => file_len.saturating_sub(r.offset),
        };
        let end = r
            .offset
            .checked_add(length)
            .ok_or_else(|| err("offset + length overflows".into()))?;
        if end > file_len {
            return Err(err(format!(
                "needs bytes {}..{end} of '{}', which has only {file_len} bytes",
                r.offset, r.location
            )));
        }
        Ok(file.data.slice(r.offset as usize..end as usize))
    }

    fn map(&mut self, location: &str) -> std::result::Result<&MappedFile, String> {
        if !self.files.contains_key(location) {
            check_location(location)?;
            let dir = self
                .dir
                .canonicalize()
                .map_err(|e| format!("model folder {}: {e}", self.dir.display()))?;
            let joined = dir.join(location);
            let path = joined
                .canonicalize()
                .map_err(|e| format!("data file {}: {e}", joined.display()))?;
            if !path.starts_with(&dir) {
                return Err(format!(
                    "location '{location}' resolves to {} outside the model's folder (symlink?)",
                    path.display()
                ));
            }
            if self.model.as_deref() == Some(path.as_path()) {
                return Err(format!("location '{location}' is the model file itself"));
            }
            // Checked before opening: opening a FIFO would block until a writer comes.
            let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if !meta.is_file() {
                return Err(format!("{} is not a regular file", path.display()));
            }
            let f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let data = if meta.len() == 0 {
                Bytes::new()
            } else {
                // SAFETY: the map is read-only; a file truncated by another process while
                // mapped would fault, as with every mmap-based ONNX loader. We never write it.
                let m = unsafe { memmap2::Mmap::map(&f) }
                    .map_err(|e| format!("mmap {}: {e}", path.display()))?;
                Bytes::from_owner(m)
            };
            self.files
                .insert(location.to_string(), MappedFile { path, data });
        }
        Ok(&self.files[location])
    }
}

#[cfg(test)]
mod tests {
    use super::check_location;

    #[test]
    fn locations() {
        assert!(check_location("model.onnx.data").is_ok());
        assert!(check_location("weights/a.bin").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a\\..\\x",
            "C:\\x",
            "\\\\server\\x",
        ] {
            assert!(check_location(bad).is_err(), "{bad} accepted");
        }
    }
}

//! Atomic file output: write beside the target, then rename.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file being written atomically: it appears under its final name only on [`commit`](Self::commit).
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

impl AtomicFile {
    /// Creates a temporary file in `target`'s folder.
    pub fn create(target: &Path) -> Result<AtomicFile> {
        let dir = parent_dir(target);
        let tmp = tempfile::Builder::new()
            .prefix(".smoe-opt-")
            .suffix(".tmp")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(|e| Error::io(target, e))?;
        Ok(AtomicFile {
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut std::fs::File {
        self.tmp.as_file_mut()
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes, syncs and renames the file to its target.
    pub fn commit(mut self) -> Result<()> {
        let target = self.target.clone();
        self.tmp
            .as_file_mut()
            .flush()
            .map_err(|e| Error::io(&target, e))?;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(&target, e))?;
        self.tmp
            .persist(&target)
            .map_err(|e| Error::io(&target, e.error))?;
        Ok(())
    }
}

/// The folder a file lives in (`.` for bare names).
pub fn parent_dir(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether two paths name the same existing file (after resolving symlinks).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.file().write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.commit()
}

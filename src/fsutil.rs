//! Atomic file output: write beside the target, then rename.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Temporary files being written, removed by [`remove_pending`] when the process is
/// interrupted (a signal skips destructors).
static PENDING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes every temporary output file still being written (for a SIGINT/SIGTERM handler).
pub fn remove_pending() {
    for p in pending().drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// A file being written atomically: it appears under its final name only on [`commit`](Self::commit).
pub struct AtomicFile {
    tmp: Option<tempfile::NamedTempFile>,
    target: PathBuf,
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(t) = &self.tmp {
            let p = t.path().to_path_buf();
            pending().retain(|q| *q != p);
        }
    }
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
            .map_err(|e| Error::Write {
                path: target.to_path_buf(),
                // tempfile's message repeats the path; the OS error alone says why.
                reason: match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        format!("its folder {} does not exist", dir.display())
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        format!("no permission to create files in {}", dir.display())
                    }
                    k => format!("cannot create a file in {}: {k}", dir.display()),
                },
            })?;
        pending().push(tmp.path().to_path_buf());
        Ok(AtomicFile {
            tmp: Some(tmp),
            target: target.to_path_buf(),
        })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut std::fs::File {
        self.tmp
            .as_mut()
            .expect("an AtomicFile holds its file until commit")
            .as_file_mut()
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        self.tmp
            .as_ref()
            .expect("an AtomicFile holds its file until commit")
            .path()
    }

    /// Flushes, syncs and renames the file to its target.
    pub fn commit(self) -> Result<()> {
        let target = self.target.clone();
        self.commit_as(&target)
    }

    /// Flushes, syncs and renames the file to `target`, a path in the same folder as the one
    /// it was created for (a name known only once the content is written).
    pub fn commit_as(mut self, target: &Path) -> Result<()> {
        let mut tmp = self
            .tmp
            .take()
            .expect("an AtomicFile holds its file until commit");
        let path = tmp.path().to_path_buf();
        pending().retain(|q| *q != path);
        tmp.as_file_mut()
            .flush()
            .map_err(|e| Error::io(target, e))?;
        tmp.as_file().sync_all().map_err(|e| Error::io(target, e))?;
        tmp.persist(target)
            .map_err(|e| Error::io(target, e.error))?;
        Ok(())
    }
}

/// The folder a file lives in (`.` for bare names).
pub fn parent_dir(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.file().write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.commit()
}

/// `p` made absolute with symlinks resolved, for a file that may not exist yet (its folder
/// resolved, its name kept).
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    match (parent_dir(p).canonicalize(), p.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => p.to_path_buf(),
    }
}

/// Whether two paths name the same file: the same resolved path (symlinks followed), or
/// (existing files) the same device and inode — a hard link is the same file under another
/// name.
pub fn same_file(a: &Path, b: &Path) -> bool {
    if resolved(a) == resolved(b) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}

/// Refuses a run whose outputs would overwrite one of its inputs, or each other.
/// `outputs` and `inputs` pair a flag (how the user named it) with a path.
pub fn check_distinct(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (flag, p)) in outputs.iter().enumerate() {
        for (iflag, ip) in inputs {
            if same_file(p, ip) {
                return Err(Error::Usage(format!(
                    "{flag} {} is the {iflag} file; smoe-opt never overwrites its inputs",
                    p.display()
                )));
            }
        }
        for (flag2, p2) in &outputs[..i] {
            if same_file(p, p2) {
                return Err(Error::Usage(format!(
                    "{flag} {} and {flag2} {} are the same file",
                    p.display(),
                    p2.display()
                )));
            }
        }
    }
    Ok(())
}

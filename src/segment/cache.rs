//! The activations between segments, on disk: one `.npy` file per batch and tensor in a
//! temporary folder (under `TMPDIR`, removed on drop). Only one batch's live tensors are in
//! memory at a time; a tensor's files are deleted as soon as no later segment reads it.
use crate::error::{Error, Result};
use crate::runtime::Value;
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of every activation cache of the process, now and at most.
static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// The most bytes the activation caches of this process held on disk at once, all caches
/// together (the flows of a sequential refit or a fidelity measurement coexist).
pub fn peak_bytes() -> u64 {
    PEAK.load(Ordering::Relaxed)
}

/// Bytes free to this user on the file system holding `dir` (None where unknown).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let s = rustix::fs::statvfs(dir).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// Per batch, the tensors stored (by name), each a file and whether it holds floats.
pub(crate) struct ActivationCache {
    dir: tempfile::TempDir,
    files: Vec<BTreeMap<String, (PathBuf, bool)>>,
    next: u64,
    bytes: u64,
    /// The most bytes stored at once.
    pub peak: u64,
}

impl ActivationCache {
    /// An empty cache for `batches` batches.
    pub fn new(batches: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("smoe-opt-activations")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        Ok(ActivationCache {
            dir,
            files: vec![BTreeMap::new(); batches],
            next: 0,
            bytes: 0,
            peak: 0,
        })
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes stored now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many batches.
    pub fn batches(&self) -> usize {
        self.files.len()
    }

    /// Stores `v` as batch `k`'s tensor `name` (replacing what was there).
    pub fn put(&mut self, k: usize, name: &str, v: &Value) -> Result<()> {
        self.remove(k, name)?;
        let path = self.dir.path().join(format!("{}.npy", self.next));
        self.next += 1;
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = std::io::BufWriter::new(file);
        let written = match v {
            Value::F32(a) => a.write_npy(&mut w),
            Value::I64(a) => a.write_npy(&mut w),
        };
        written.map_err(|e| Error::Write {
            path: path.clone(),
            reason: format!("activation '{name}': {e}"),
        })?;
        drop(w);
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        self.bytes += len;
        self.peak = self.peak.max(self.bytes);
        let live = LIVE.fetch_add(len, Ordering::Relaxed) + len;
        PEAK.fetch_max(live, Ordering::Relaxed);
        let floats = matches!(v, Value::F32(_));
        self.files[k].insert(name.to_string(), (path, floats));
        Ok(())
    }

    /// Every tensor stored for batch `k`.
    pub fn get(&self, k: usize) -> Result<Vec<(String, Value)>> {
        self.files[k]
            .iter()
            .map(|(name, (path, floats))| {
                let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                let r = std::io::BufReader::new(file);
                let bad = |e: ndarray_npy::ReadNpyError| Error::Write {
                    path: path.clone(),
                    reason: format!("activation '{name}' does not read back: {e}"),
                };
                let v = if *floats {
                    Value::F32(ArrayD::<f32>::read_npy(r).map_err(bad)?)
                } else {
                    Value::I64(ArrayD::<i64>::read_npy(r).map_err(bad)?)
                };
                Ok((name.clone(), v))
            })
            .collect()
    }

    /// Deletes, in every batch, the tensors `keep` rejects.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Result<()> {
        for k in 0..self.files.len() {
            self.retain_batch(k, &keep)?;
        }
        Ok(())
    }

    /// Deletes batch `k`'s tensors that `keep` rejects.
    pub fn retain_batch(&mut self, k: usize, keep: impl Fn(&str) -> bool) -> Result<()> {
        let dead: Vec<String> = self.files[k].keys().filter(|n| !keep(n)).cloned().collect();
        for n in dead {
            self.remove(k, &n)?;
        }
        Ok(())
    }

    fn remove(&mut self, k: usize, name: &str) -> Result<()> {
        if let Some((path, _)) = self.files[k].remove(name) {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            self.bytes = self.bytes.saturating_sub(len);
            LIVE.fetch_sub(len.min(LIVE.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for ActivationCache {
    fn drop(&mut self) {
        // The folder and its files go with `dir`.
        LIVE.fetch_sub(
            self.bytes.min(LIVE.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }
}

//! Tensors moved out of memory while a model is rewritten layer by layer: a layer's new
//! weights are appended to an unnamed temporary file (under TMPDIR, deleted when the last
//! view of it goes) and the tensors become views of a read-only mapping of that file. The
//! model is unchanged for every reader (the tensors are still inline `raw_data`); only the
//! bytes live in the page cache instead of the heap, and [`Spill::release`] drops them from
//! the resident set after a pass over them (writing the output).
use crate::error::{Error, Result};
use crate::model::Model;
use bytes::Bytes;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

/// Smallest tensor worth moving (smaller ones stay on the heap).
const MIN_BYTES: usize = 64 << 10;
/// Chunks start page-aligned (a mapping's offset must be).
const ALIGN: u64 = 64 << 10;

/// The spill file of one run and the mappings of what was moved into it (shared by the
/// model's clones).
#[derive(Debug, Clone, Default)]
pub struct Spill {
    inner: Arc<Mutex<Option<Inner>>>,
}

#[derive(Debug)]
struct Inner {
    file: std::fs::File,
    len: u64,
    maps: Vec<Bytes>,
}

impl Spill {
    /// Moves every inline initializer of `model` of at least 64 KiB that is on the heap into
    /// the spill file. Returns the bytes moved.
    pub fn take(&self, model: &mut Model) -> Result<u64> {
        let dir = std::env::temp_dir();
        let err = |e: std::io::Error| {
            Error::Usage(format!(
                "writing rewritten weights to a temporary file under {} (TMPDIR): {e}",
                dir.display()
            ))
        };
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(Inner {
                file: tempfile::tempfile_in(&dir).map_err(err)?,
                len: 0,
                maps: Vec::new(),
            });
        }
        let inner = guard.as_mut().expect("just set");
        let moved: Vec<&mut crate::ir::Initializer> = model
            .graph
            .inits
            .values_mut()
            .filter(|i| {
                i.proto
                    .raw_data
                    .as_ref()
                    .is_some_and(|r| r.len() >= MIN_BYTES && !inner.holds(r))
            })
            .collect();
        if moved.is_empty() {
            return Ok(0);
        }
        let start = inner.len.next_multiple_of(ALIGN);
        inner.file.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, &inner.file);
        let mut at = Vec::with_capacity(moved.len());
        let mut len = 0usize;
        for i in &moved {
            let r = i.proto.raw_data.as_ref().expect("filtered");
            w.write_all(r).map_err(err)?;
            at.push((len, r.len()));
            len += r.len();
        }
        w.flush().map_err(err)?;
        drop(w);
        // SAFETY: the region was just written by this process and is never written again
        // (later chunks start past it); the file is unnamed, so no other process can
        // truncate it while mapped.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len(len)
                .map(&inner.file)
        }
        .map_err(err)?;
        let map = Bytes::from_owner(map);
        for (i, (off, n)) in moved.into_iter().zip(at) {
            i.proto.raw_data = Some(map.slice(off..off + n));
        }
        inner.len = start + len as u64;
        inner.maps.push(map);
        Ok(len as u64)
    }

    /// Drops the pages of the spilled tensors from the resident set (see
    /// [`super::ExternalStore::release`]).
    pub fn release(&self) {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for m in guard.iter().flat_map(|i| &i.maps) {
            // SAFETY: `m` is a whole read-only shared mapping of a file region this process
            // never writes again: unmapped pages come back with the same bytes.
            #[cfg(unix)]
            let _ = unsafe {
                rustix::mm::madvise(
                    m.as_ptr() as *mut std::ffi::c_void,
                    m.len(),
                    rustix::mm::Advice::LinuxDontNeed,
                )
            };
        }
    }
}

impl Inner {
    /// Whether `b` is a view of one of the spill's mappings.
    fn holds(&self, b: &Bytes) -> bool {
        let p = b.as_ptr() as usize;
        self.maps.iter().any(|m| {
            let s = m.as_ptr() as usize;
            p >= s && p < s + m.len()
        })
    }
}

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

    /// Makes `into`'s heap tensors that `from` holds spilled, under the same name and with
    /// the same bytes, views of `from`'s spilled copies (a rewritten segment and the output
    /// the same layer was written into). Returns the bytes freed.
    pub fn share(from: &Model, into: &mut Model) -> u64 {
        let guard = from.spill.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(inner) = guard.as_ref() else {
            return 0;
        };
        let mut freed = 0;
        for i in into.graph.inits.values_mut() {
            let Some(r) = i.proto.raw_data.as_ref().filter(|r| r.len() >= MIN_BYTES) else {
                continue;
            };
            let name = i.proto.name.as_deref().unwrap_or("");
            let spilled = from
                .graph
                .initializer(name)
                .and_then(|o| o.proto.raw_data.as_ref())
                .filter(|o| inner.holds(o) && o.len() == r.len() && *o == r);
            if let Some(o) = spilled {
                freed += r.len() as u64;
                i.proto.raw_data = Some(o.clone());
            }
        }
        freed
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

#[cfg(test)]
mod tests {
    use crate::ir::Initializer;
    use crate::model::Model;

    #[test]
    fn spilled_tensors_keep_their_bytes_and_are_written_out() {
        let root = env!("CARGO_MANIFEST_DIR");
        let path = format!("{root}/testdata/models/mixtral_v4_ts/model.onnx");
        let mut m = Model::load(&path).unwrap();
        let data: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = crate::ir::builder::tensor_f32("big", &[200, 200], &data);
        let want = t.raw_data.clone().unwrap();
        m.graph.inits.insert(
            "big".into(),
            Initializer {
                proto: t,
                external: None,
            },
        );
        let moved = m.spill().unwrap();
        assert!(moved >= want.len() as u64, "{moved}");
        let got = m
            .graph
            .initializer("big")
            .unwrap()
            .proto
            .raw_data
            .clone()
            .unwrap();
        assert_eq!(got, want);
        assert_ne!(got.as_ptr(), want.as_ptr(), "still on the heap");
        // What was moved is not moved again; released pages read back the same.
        assert_eq!(m.spill().unwrap(), 0);
        m.release_mapped();
        assert_eq!(got, want);
        // A clone shares the spill; both write the same model.
        let copy = m.clone();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.onnx");
        let opts = crate::onnx::SaveOptions {
            external_data: true,
            ..Default::default()
        };
        copy.save(&out, &opts).unwrap();
        let back = Model::load(&out).unwrap();
        let b = back.graph.initializer("big").unwrap();
        assert_eq!(b.external.as_ref().unwrap(), &want);
        let original = Model::load(&path).unwrap();
        for i in original.graph.initializers() {
            let name = i.proto.name.as_deref().unwrap();
            let a = back.graph.initializer(name).unwrap();
            let bytes = |x: &Initializer| x.external.clone().or(x.proto.raw_data.clone());
            assert_eq!(bytes(i), bytes(a), "{name}");
        }
    }
}

//! Reading user-supplied files safely: regular files only (a FIFO would hang, a device never
//! ends), sizes bounded, and the memory available to check allocations against.
use crate::error::{Error, Result};
use std::path::Path;

/// Opens `path` for reading only if it is a regular file (after symlinks): a FIFO would block
/// forever, a device such as `/dev/zero` never ends, a folder cannot be read as data.
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "a folder"
        } else if ft.is_fifo() {
            "a FIFO (named pipe)"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!("is {kind}; smoe-opt reads regular files only"),
        });
    }
    std::fs::File::open(path).map_err(|e| Error::io(path, e))
}

/// Reads a regular text file of at most `limit` bytes (`what` names it in the error).
pub fn read_text(path: &Path, limit: u64, what: &str) -> Result<String> {
    use std::io::Read;
    let f = open_regular(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > limit {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "{what} of {len} bytes is larger than the {limit} bytes smoe-opt reads"
            ),
        });
    }
    let mut s = String::with_capacity(len as usize);
    f.take(limit)
        .read_to_string(&mut s)
        .map_err(|e| Error::io(path, e))?;
    Ok(s)
}

/// Bytes of memory available to this process (Linux `MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

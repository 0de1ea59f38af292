//! `.npz` arrays are checked before they are read: each `.npy` header's shape must describe
//! exactly the bytes the archive entry holds, and fit in memory. A header claiming a huge
//! shape would otherwise make the reader allocate it (an abort, not an error).
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Checks every array header of the `.npz` at `path`.
pub fn check(path: &Path) -> Result<()> {
    let bad = |reason: String| Error::Input {
        path: path.to_path_buf(),
        reason,
    };
    let f = crate::inputs::open_regular(path)?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(format!("not an .npz archive: {e}")))?;
    let avail = crate::inputs::available_memory().unwrap_or(u64::MAX);
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("not an .npz archive: {e}")))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let size = entry.size();
        let mut head = [0u8; 10];
        entry
            .read_exact(&mut head)
            .map_err(|_| bad(format!("array '{name}' is not an .npy array")))?;
        if &head[..6] != b"\x93NUMPY" {
            return Err(bad(format!("array '{name}' is not an .npy array")));
        }
        let (hlen, pre) = match head[6] {
            1 => (u16::from_le_bytes([head[8], head[9]]) as u64, 10),
            2 | 3 => {
                let mut more = [0u8; 2];
                entry
                    .read_exact(&mut more)
                    .map_err(|_| bad(format!("array '{name}': truncated header")))?;
                (
                    u32::from_le_bytes([head[8], head[9], more[0], more[1]]) as u64,
                    12,
                )
            }
            v => return Err(bad(format!("array '{name}': .npy version {v}"))),
        };
        if hlen > 1 << 20 {
            return Err(bad(format!("array '{name}': header of {hlen} bytes")));
        }
        let mut header = vec![0u8; hlen as usize];
        entry
            .read_exact(&mut header)
            .map_err(|_| bad(format!("array '{name}': truncated header")))?;
        let header = String::from_utf8_lossy(&header);
        let (elem, dims) = parse_header(&header)
            .ok_or_else(|| bad(format!("array '{name}': unreadable header {header:?}")))?;
        let claimed = dims
            .iter()
            .try_fold(elem, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("array '{name}': shape {dims:?} overflows")))?;
        let held = size.saturating_sub(pre + hlen);
        if claimed != held {
            return Err(bad(format!(
                "array '{name}': its header claims shape {dims:?} ({claimed} bytes) but the \
                 archive holds {held} bytes of data"
            )));
        }
        if claimed > avail {
            return Err(bad(format!(
                "array '{name}' of {claimed} bytes does not fit in the {avail} bytes of memory \
                 available"
            )));
        }
    }
    Ok(())
}

/// Element size and shape from an `.npy` header dict (`{'descr': '<f4', 'fortran_order':
/// False, 'shape': (2, 3), }`).
fn parse_header(h: &str) -> Option<(u64, Vec<u64>)> {
    let descr = h.split("'descr':").nth(1)?;
    let descr = descr.split('\'').nth(1)?;
    let elem: u64 = descr
        .trim_start_matches(['<', '>', '|', '='])
        .get(1..)?
        .parse()
        .ok()?;
    let shape = h.split("'shape':").nth(1)?;
    let shape = shape.split('(').nth(1)?.split(')').next()?;
    let dims = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    Some((elem, dims))
}

#[cfg(test)]
mod tests {
    use super::parse_header;

    #[test]
    fn headers_parse() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        assert_eq!(parse_header(h), Some((4, vec![2, 3])));
        let h = "{'descr': '|b1', 'fortran_order': False, 'shape': (7,), }";
        assert_eq!(parse_header(h), Some((1, vec![7])));
        let h = "{'descr': '<i8', 'fortran_order': False, 'shape': (), }";
        assert_eq!(parse_header(h), Some((8, vec![])));
    }
}

//! Just enough of the GGUF header to say clearly what is wrong with a model file before llama.cpp
//! is asked to load it (llama.cpp itself only reports "failed to load" to the caller): missing file,
//! not GGUF, or an architecture that does not fit the configured kind.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Reads `general.architecture` from a GGUF file's metadata.
pub fn architecture(path: &Path) -> Result<String, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)
        .map_err(|_| format!("{} is not a GGUF file (too short)", path.display()))?;
    if &magic != b"GGUF" {
        return Err(format!(
            "{} is not a GGUF file (no GGUF magic)",
            path.display()
        ));
    }
    let bad = |what: &str| format!("{} is a damaged GGUF file ({what})", path.display());
    let version = read_u32(&mut r).map_err(|_| bad("header"))?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "{} uses GGUF version {version}; versions 2 and 3 are supported",
            path.display()
        ));
    }
    let _tensors = read_u64(&mut r).map_err(|_| bad("header"))?;
    let kvs = read_u64(&mut r).map_err(|_| bad("header"))?;
    for _ in 0..kvs {
        let key = read_string(&mut r).map_err(|_| bad("metadata key"))?;
        let ty = read_u32(&mut r).map_err(|_| bad("metadata type"))?;
        if key == b"general.architecture" && ty == STRING {
            let arch = read_string(&mut r).map_err(|_| bad("architecture"))?;
            return Ok(String::from_utf8_lossy(&arch).into_owned());
        }
        skip_value(&mut r, ty).map_err(|_| bad("metadata value"))?;
    }
    Err(format!(
        "{} has no general.architecture in its metadata",
        path.display()
    ))
}

const STRING: u32 = 8;
const ARRAY: u32 = 9;
/// Longest metadata string read into memory (keys and the architecture name are short).
const MAX_STRING: u64 = 1 << 20;

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let mut s = vec![0u8; len as usize];
    r.read_exact(&mut s)?;
    Ok(s)
}

/// Size of a fixed-size value type, `None` for strings and arrays.
fn fixed_size(ty: u32) -> std::io::Result<Option<i64>> {
    Ok(match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        STRING | ARRAY => None,
        _ => return Err(std::io::ErrorKind::InvalidData.into()),
    })
}

fn skip_value<R: Read + Seek>(r: &mut R, ty: u32) -> std::io::Result<()> {
    if let Some(n) = fixed_size(ty)? {
        r.seek(SeekFrom::Current(n))?;
        return Ok(());
    }
    if ty == STRING {
        let len = read_u64(r)?;
        r.seek(SeekFrom::Current(i64::try_from(len).map_err(|_| {
            std::io::Error::from(std::io::ErrorKind::InvalidData)
        })?))?;
        return Ok(());
    }
    let item = read_u32(r)?;
    let count = read_u64(r)?;
    match fixed_size(item)? {
        Some(n) => {
            let total = i64::try_from(count)
                .ok()
                .and_then(|c| c.checked_mul(n))
                .ok_or(std::io::ErrorKind::InvalidData)?;
            r.seek(SeekFrom::Current(total))?;
        }
        None => {
            for _ in 0..count {
                skip_value(r, item)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gguf(kvs: &[(&str, u32, Vec<u8>)]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in kvs {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        f.write_all(&b).unwrap();
        f
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn finds_architecture_after_other_values() {
        let mut arr = STRING.to_le_bytes().to_vec();
        arr.extend_from_slice(&2u64.to_le_bytes());
        arr.extend(string("a"));
        arr.extend(string("bc"));
        let f = gguf(&[
            ("general.name", STRING, string("x")),
            ("some.u32", 4, 7u32.to_le_bytes().to_vec()),
            ("tokens", ARRAY, arr),
            ("general.architecture", STRING, string("llama")),
        ]);
        assert_eq!(architecture(f.path()).unwrap(), "llama");
    }

    #[test]
    fn explains_what_is_wrong() {
        let missing = architecture(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(missing.contains("cannot open"), "{missing}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"<html>not a model</html>").unwrap();
        let e = architecture(f.path()).unwrap_err();
        assert!(e.contains("not a GGUF file"), "{e}");
        let f = gguf(&[("general.name", STRING, string("x"))]);
        let e = architecture(f.path()).unwrap_err();
        assert!(e.contains("no general.architecture"), "{e}");
    }
}

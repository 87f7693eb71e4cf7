//! The two files `torch.save` writes around its pickle: a zip archive (torch >= 1.6) or the
//! legacy stream of pickles followed by raw storages. Both give the unpickled object, where each
//! storage's bytes are in the file, and the byte order.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use super::vm::{self, Fault, Heap, Value};
use crate::{Error, Result};

/// The legacy format's first pickle: `torch.serialization.MAGIC_NUMBER`
/// (0x1950a86a20f9469cfc6c) as LONG1's little-endian bytes.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// `torch.serialization.PROTOCOL_VERSION`.
const LEGACY_PROTOCOL: i64 = 1001;

/// What a checkpoint's container holds.
pub(super) struct Parsed {
    /// The unpickled object.
    pub object: Value,
    /// The containers it refers to.
    pub heap: Heap,
    /// Storage key to its bytes in the file.
    pub storages: HashMap<String, Range<usize>>,
    /// Storages are big-endian.
    pub big_endian: bool,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadPickle {
        file: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn fault(path: &Path, what: &str, f: Fault) -> Error {
    match f {
        Fault::Unsafe(global) => Error::UnsafePickle {
            file: path.to_path_buf(),
            global,
        },
        Fault::Bad(reason) => bad(path, format!("{what}: {reason}")),
    }
}

/// Reads the container of `data` (the whole file).
pub(super) fn read(data: &[u8], path: &Path) -> Result<Parsed> {
    if data.starts_with(b"PK\x03\x04") {
        read_zip(data, path)
    } else {
        read_legacy(data, path)
    }
}

/// Storages are known by key; their dtype and size come with the persistent id.
fn unpickle_with_storages(data: &[u8], pos: &mut usize, path: &Path, what: &str) -> Result<(Value, Heap)> {
    vm::unpickle(data, pos, &mut vm::storage_from_pid).map_err(|f| fault(path, what, f))
}

fn read_zip(data: &[u8], path: &Path) -> Result<Parsed> {
    let zip_err = |e: zip::result::ZipError| bad(path, format!("zip archive: {e}"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(zip_err)?;
    let mut entries: HashMap<String, Range<usize>> = HashMap::new();
    for i in 0..archive.len() {
        let f = archive.by_index_raw(i).map_err(zip_err)?;
        let name = f.name().map_err(zip_err)?.into_owned();
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(bad(
                path,
                format!("{name}: compressed zip entries are not supported (torch.save stores them uncompressed)"),
            ));
        }
        let start = f
            .data_start()
            .ok_or_else(|| bad(path, format!("{name}: no data offset")))?;
        let range = usize::try_from(start)
            .ok()
            .zip(usize::try_from(f.size()).ok())
            .and_then(|(s, n)| Some(s..s.checked_add(n)?))
            .filter(|r| r.end <= data.len())
            .ok_or_else(|| bad(path, format!("{name}: entry reaches past the end of the file")))?;
        entries.insert(name, range);
    }
    let pkl = entries
        .keys()
        .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .min()
        .cloned()
        .ok_or_else(|| bad(path, "zip archive without <folder>/data.pkl (not a torch.save file)"))?;
    let folder = pkl.strip_suffix("data.pkl").expect("filtered by suffix").to_string();
    let big_endian = match entries.get(&format!("{folder}byteorder")) {
        None => false,
        Some(r) => match &data[r.clone()] {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(bad(
                    path,
                    format!("{folder}byteorder: {:?}", String::from_utf8_lossy(other)),
                ))
            }
        },
    };
    let r = entries[&pkl].clone();
    let mut pos = 0;
    let (object, heap) = unpickle_with_storages(&data[r], &mut pos, path, &pkl)?;
    let prefix = format!("{folder}data/");
    let storages = entries
        .into_iter()
        .filter_map(|(n, r)| Some((n.strip_prefix(&prefix)?.to_string(), r)))
        .collect();
    Ok(Parsed {
        object,
        heap,
        storages,
        big_endian,
    })
}

fn read_legacy(data: &[u8], path: &Path) -> Result<Parsed> {
    let mut pos = 0;
    let plain = |what: &str, pos: &mut usize| -> Result<(Value, Heap)> {
        vm::unpickle(data, pos, &mut |_, _| {
            Err(Fault::Bad("persistent id outside the main pickle".into()))
        })
        .map_err(|f| fault(path, what, f))
    };
    let not_torch = "not a torch.save file (neither a zip archive nor the legacy format's magic number)";
    match plain("magic number", &mut pos) {
        Ok((Value::BigInt(b), _)) if b == MAGIC => {}
        Ok(_) | Err(Error::BadPickle { .. }) => return Err(bad(path, not_torch)),
        Err(e) => return Err(e),
    }
    match plain("protocol version", &mut pos)?.0 {
        Value::Int(LEGACY_PROTOCOL) => {}
        Value::Int(v) => return Err(bad(path, format!("legacy protocol version {v}, expected 1001"))),
        other => return Err(bad(path, format!("legacy protocol version is a {}", other.kind()))),
    }
    let big_endian = match plain("sys_info", &mut pos)? {
        (Value::Dict(d), heap) => !heap
            .dict(d)
            .iter()
            .any(|(k, v)| matches!((k, v), (Value::Str(k), Value::Bool(true)) if &**k == "little_endian")),
        (other, _) => return Err(bad(path, format!("sys_info is a {}, not a dict", other.kind()))),
    };
    let mut sizes: HashMap<String, usize> = HashMap::new();
    let (object, heap) = vm::unpickle(data, &mut pos, &mut |pid, heap| {
        let v = vm::storage_from_pid(pid, heap)?;
        if let Value::Storage(s) = &v {
            let size = s.kind.1.map_or(1, |d| d.size_in_bytes());
            sizes.insert(s.key.clone(), size);
        }
        Ok(v)
    })
    .map_err(|f| fault(path, "main pickle", f))?;
    let keys = match plain("storage keys", &mut pos)? {
        (Value::List(l), heap) => heap
            .seq(l)
            .iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s.to_string()),
                other => Err(bad(path, format!("a storage key is a {}", other.kind()))),
            })
            .collect::<Result<Vec<_>>>()?,
        (other, _) => return Err(bad(path, format!("storage keys are a {}, not a list", other.kind()))),
    };
    let mut storages = HashMap::new();
    for key in keys {
        let elem = sizes.get(&key).copied().unwrap_or(1);
        let head = data
            .get(pos..pos + 8)
            .ok_or_else(|| bad(path, format!("storage {key:?}: truncated before its size")))?;
        let mut word: [u8; 8] = head.try_into().expect("8 bytes");
        if big_endian {
            word.reverse();
        }
        let n = u64::from_le_bytes(word);
        let range = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(elem))
            .and_then(|len| Some(pos + 8..(pos + 8).checked_add(len)?))
            .filter(|r| r.end <= data.len())
            .ok_or_else(|| {
                bad(
                    path,
                    format!("storage {key:?}: {n} elements reach past the end of the file"),
                )
            })?;
        pos = range.end;
        storages.insert(key, range);
    }
    Ok(Parsed {
        object,
        heap,
        storages,
        big_endian,
    })
}

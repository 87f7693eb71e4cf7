//! PyTorch pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`), read without Python and without
//! running code: a restricted unpickler ([`vm`]) rebuilds tensors, (ordered) dicts and plain
//! values and refuses every other Python global, naming it ([`crate::Error::UnsafePickle`]).
//! Counterpart: `torch/serialization.py` (`_save`, `_legacy_save`, `_load`, `_legacy_load`).
//!
//! Containers ([`container`]):
//! - zip (torch >= 1.6): `<folder>/data.pkl` (any folder name), storages `<folder>/data/<key>`,
//!   stored uncompressed, byte order from `<folder>/byteorder` (little when absent);
//! - legacy (`_use_new_zipfile_serialization=False`): pickles of the magic number, the protocol
//!   version and `sys_info` (byte order), the main pickle, the sorted storage keys, then each
//!   storage as an element count (u64) and its raw bytes.
//!
//! The tensors are the object's tensor leaves: after stepping into `state_dict` while the
//! object is a dict holding one (as diffusers' single-file loader does), nested dicts give
//! dotted names (`{"model": {"w": t}}` is `model.w`). Any other leaf (a number, a string, a
//! list) is an error naming it. Tensors are views into storages (offset and strides), copied
//! out contiguous on [`PickleFile::load`]; the file stays memory-mapped until then.

mod container;
mod vm;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::{Error, Result};
use vm::{Heap, TensorRef, Value};

/// Where a tensor's elements are: a strided view into one storage, with everything owned so that
/// the file can be shared across threads.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    /// The storage's bytes in the file.
    bytes: Range<usize>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// An opened pickle checkpoint: the memory-mapped file and where each tensor lies in it.
pub struct PickleFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    big_endian: bool,
    tensors: BTreeMap<String, Entry>,
}

/// Whether the first bytes of a file look like a PyTorch checkpoint: a zip archive or a legacy
/// pickle stream (protocol opcode first).
pub fn looks_like_pickle(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80)
}

impl PickleFile {
    /// Opens `path` (zip or legacy format) and reads where its tensors are; a refused global,
    /// a malformed pickle, a tensor outside its storage or an unsupported dtype is an error
    /// naming the file (and the tensor).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; see `WeightFile::open`.
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        let parsed = container::read(&mmap, path)?;
        let mut tensors = BTreeMap::new();
        let mut refs = Vec::new();
        let heap = &parsed.heap;
        collect(
            &state_dict(parsed.object, heap),
            String::new(),
            &mut refs,
            heap,
            path,
            0,
        )?;
        for (name, t) in refs {
            let entry = entry(&t, &parsed.storages, path, &name)?;
            tensors.insert(name, entry);
        }
        Ok(PickleFile {
            path: path.to_path_buf(),
            mmap,
            big_endian: parsed.big_endian,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    /// Tensor `name`'s dtype, shape and elements, contiguous and little-endian.
    pub fn bytes(&self, name: &str) -> Result<(DType, Vec<usize>, Cow<'_, [u8]>)> {
        let e = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.path.clone(),
            name: name.to_string(),
        })?;
        let storage = &self.mmap[e.bytes.clone()];
        let size = e.dtype.size_in_bytes();
        let contiguous = contiguous_strides(&e.shape);
        let mut bytes = if e.stride == contiguous || e.shape.iter().product::<usize>() <= 1 {
            let n: usize = e.shape.iter().product();
            Cow::Borrowed(&storage[e.offset * size..(e.offset + n) * size])
        } else {
            Cow::Owned(gather(storage, size, e.offset, &e.shape, &e.stride))
        };
        if self.big_endian && size > 1 {
            bytes.to_mut().chunks_exact_mut(size).for_each(|c| c.reverse());
        }
        Ok((e.dtype, e.shape.clone(), bytes))
    }
}

/// Reads every tensor of a pickle checkpoint (see the module docs) onto the CPU, by name.
pub fn read_pickle(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = super::WeightFile::open(path)?;
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.load(&n, &candle_core::Device::Cpu)?;
            Ok((n, t))
        })
        .collect()
}

/// The row-major strides of `shape`.
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Copies the elements of a strided view out in row-major order (bounds checked by [`entry`]).
fn gather(storage: &[u8], size: usize, offset: usize, shape: &[usize], stride: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n * size);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let at = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[at * size..(at + 1) * size]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Steps into `state_dict` while the object is a dict holding one (at most [`MAX_DEPTH`] times:
/// a dict can hold itself).
fn state_dict(mut v: Value, heap: &Heap) -> Value {
    for _ in 0..MAX_DEPTH {
        let inner = match &v {
            Value::Dict(d) => heap
                .dict(*d)
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if &**s == "state_dict"))
                .map(|(_, x)| x.clone())
                .filter(|x| matches!(x, Value::Dict(_))),
            _ => None,
        };
        match inner {
            Some(x) => v = x,
            None => break,
        }
    }
    v
}

/// Nested dicts deeper than this are refused (a pickle can hold a dict that contains itself).
const MAX_DEPTH: usize = 32;

/// Collects the tensor leaves of `v` under dotted names.
fn collect(
    v: &Value,
    name: String,
    out: &mut Vec<(String, TensorRef)>,
    heap: &Heap,
    path: &Path,
    depth: usize,
) -> Result<()> {
    let bad = |reason: String| Error::BadPickle {
        file: path.to_path_buf(),
        reason,
    };
    match v {
        Value::Tensor(t) => {
            out.push((name, (**t).clone()));
            Ok(())
        }
        Value::Dict(_) if depth >= MAX_DEPTH => Err(bad(format!("{name}: dicts nested deeper than {MAX_DEPTH}"))),
        Value::Dict(d) => {
            for (k, x) in heap.dict(*d) {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(bad(format!("{name}: a dict key is a {}", other.kind()))),
                };
                let full = if name.is_empty() { key } else { format!("{name}.{key}") };
                collect(x, full, out, heap, path, depth + 1)?;
            }
            Ok(())
        }
        other if name.is_empty() => Err(bad(format!(
            "the checkpoint holds a {}, not a dict of tensors",
            other.kind()
        ))),
        other => Err(bad(format!("{name}: a {}, not a tensor", other.kind()))),
    }
}

/// Checks a tensor against its storage (dtype known, every element inside) and resolves where
/// the storage is.
fn entry(t: &TensorRef, storages: &HashMap<String, Range<usize>>, path: &Path, name: &str) -> Result<Entry> {
    let bad = |reason: String| Error::BadPickle {
        file: path.to_path_buf(),
        reason: format!("{name}: {reason}"),
    };
    let (kind, dtype) = t.storage.kind;
    let dtype = dtype.ok_or_else(|| bad(format!("{kind} tensors are not supported")))?;
    let bytes = storages
        .get(&t.storage.key)
        .ok_or_else(|| bad(format!("storage {:?} is not in the file", t.storage.key)))?
        .clone();
    let size = dtype.size_in_bytes();
    let have = bytes.len() / size;
    if bytes.len() % size != 0 || have < t.storage.numel {
        return Err(bad(format!(
            "storage {:?} holds {} bytes, not {} {kind} elements",
            t.storage.key,
            bytes.len(),
            t.storage.numel
        )));
    }
    // One past the last element the view reaches; an empty view reaches only its offset.
    let reach = if t.shape.contains(&0) {
        Some(t.offset)
    } else {
        t.shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?))
            .and_then(|last| last.checked_add(1))
    };
    match reach {
        Some(end) if end <= have => Ok(Entry {
            dtype,
            bytes,
            offset: t.offset,
            shape: t.shape.clone(),
            stride: t.stride.clone(),
        }),
        _ => Err(bad(format!(
            "view (offset {}, size {:?}, stride {:?}) reaches past its storage of {have} elements",
            t.offset, t.shape, t.stride
        ))),
    }
}

//! Memory-mapped safetensors files, one or several (shards), with shape checks and a record of
//! which tensors were read, so that a loader can report tensors the model did not use.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};

use crate::{Error, Result};

/// One safetensors file, memory-mapped and validated (header, offsets, length).
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    meta: Metadata,
}

impl SafetensorsFile {
    /// Opens and validates `path`; a truncated or corrupt file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us while loading is outside
        // what any loader can guard against (candle and safetensors map files the same way).
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::BadSafetensors { file: path.to_path_buf(), reason: describe(&e) })?;
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start: 8 + n, meta })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> HashMap<String, String> {
        self.meta.metadata().clone().unwrap_or_default()
    }

    /// The names of all tensors in the file.
    pub fn names(&self) -> Vec<String> {
        self.meta.tensors().into_keys().collect()
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.meta.info(name).map(|i| i.shape.clone())
    }

    /// Loads tensor `name` in its stored dtype onto `device`.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::MissingTensor { file: self.path.clone(), name: name.to_string() })?;
        self.load_info(name, info, device)
    }

    fn load_info(&self, name: &str, info: &TensorInfo, device: &Device) -> Result<Tensor> {
        let dtype = convert_dtype(info.dtype).ok_or_else(|| Error::BadSafetensors {
            file: self.path.clone(),
            reason: format!("{name}: unsupported dtype {:?}", info.dtype),
        })?;
        let (s, e) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + s..self.data_start + e];
        let t = Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu)?;
        Ok(t.to_device(device)?)
    }
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => "file length does not match its header (truncated?)".into(),
        E::HeaderTooSmall | E::InvalidHeaderLength => "header is cut short (truncated?)".into(),
        other => other.to_string(),
    }
}

fn convert_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

/// A set of safetensors files seen as one checkpoint (a single file or the shards of one).
pub struct TensorStore {
    label: PathBuf,
    files: Vec<SafetensorsFile>,
    location: HashMap<String, usize>,
    used: Mutex<BTreeSet<String>>,
}

impl TensorStore {
    /// Opens one or more files; `label` names the checkpoint in errors (the file, or the shard
    /// index for sharded checkpoints). A tensor present in two files is an error.
    pub fn open(label: impl Into<PathBuf>, paths: &[PathBuf]) -> Result<Self> {
        let label = label.into();
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = SafetensorsFile::open(p)?;
            for name in f.names() {
                if location.insert(name.clone(), i).is_some() {
                    return Err(Error::BadSafetensors {
                        file: p.clone(),
                        reason: format!("tensor {name} is also in another shard"),
                    });
                }
            }
            files.push(f);
        }
        Ok(TensorStore { label, files, location, used: Mutex::new(BTreeSet::new()) })
    }

    /// Opens a single file.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open(path, &[path.to_path_buf()])
    }

    /// The name used for this checkpoint in errors.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// Whether tensor `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.location.get(name).and_then(|&i| self.files[i].shape(name))
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.location.keys().cloned().collect();
        v.sort();
        v
    }

    /// The files' metadata, merged (first file wins on conflicts).
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        for f in self.files.iter().rev() {
            m.extend(f.metadata());
        }
        m
    }

    /// Loads `name`, checking its shape when `expected` is given, converted to `dtype` on
    /// `device`, and marks it used.
    pub fn get(&self, name: &str, expected: Option<&[usize]>, dtype: DType, device: &Device) -> Result<Tensor> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| Error::MissingTensor { file: self.label.clone(), name: name.to_string() })?;
        let file = &self.files[i];
        if let Some(expected) = expected {
            let got = file.shape(name).expect("name is in the location map");
            if got != expected {
                return Err(Error::ShapeMismatch {
                    file: file.path.clone(),
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    got,
                });
            }
        }
        let t = file.load(name, device)?;
        self.used.lock().expect("used-set lock").insert(name.to_string());
        Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? })
    }

    /// Names of tensors never read through [`TensorStore::get`], sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().expect("used-set lock");
        let mut v: Vec<String> = self.location.keys().filter(|k| !used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// Fails if a tensor went unused, except names for which `allowed` returns true (known
    /// non-parameter buffers).
    pub fn check_all_used(&self, allowed: impl Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = self.unused().into_iter().filter(|n| !allowed(n)).collect();
        if names.is_empty() {
            Ok(())
        } else {
            Err(Error::UnusedTensors { file: self.label.clone(), names })
        }
    }
}

/// Writes `tensors` to `path` as safetensors via a temporary file and a rename, so that no
/// half-written file is ever left at `path`.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let tmp = tmp_path(path);
    let write = || -> Result<()> {
        let mut data: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
        for (k, t) in tensors {
            data.push((k, t.to_device(&Device::Cpu)?.contiguous()?));
        }
        let views: Vec<(&String, &Tensor)> = data.iter().map(|(k, t)| (*k, t)).collect();
        safetensors::serialize_to_file(views, metadata, &tmp)
            .map_err(|e| Error::BadSafetensors { file: tmp.clone(), reason: e.to_string() })?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// A temporary sibling of `path` for write-then-rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

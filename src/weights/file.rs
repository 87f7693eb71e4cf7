//! One weight file, whatever its format: safetensors (memory-mapped, validated) or a PyTorch
//! pickle checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`, read by the restricted unpickler of
//! [`super::pickle`]). Loaders take either through the same names, shapes and `load`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};

use super::pickle::{looks_like_pickle, PickleFile};
use super::store::non_finite;
use crate::{Error, Result};

enum Format {
    Safetensors {
        mmap: memmap2::Mmap,
        data_start: usize,
        meta: Metadata,
    },
    Pickle(PickleFile),
}

/// One weight file, opened and validated: safetensors, or a PyTorch pickle checkpoint.
pub struct WeightFile {
    path: PathBuf,
    format: Format,
}

impl WeightFile {
    /// Opens and validates `path`: a `.safetensors` file, or any other file that starts as a
    /// PyTorch checkpoint does (zip archive, legacy pickle), read as one; other files are read as
    /// safetensors. A truncated or corrupt file, or a pickle that names a Python global outside
    /// the tensor-rebuilding ones, is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::input(path.display().to_string(), "a folder, not a weight file"));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us while loading is outside
        // what any loader can guard against (candle and safetensors map files the same way).
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        let named_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        // A safetensors header is JSON from byte 8 on, so `{` there tells it from a pickle whose
        // first byte happens to equal a header length's.
        if !named_safetensors && looks_like_pickle(&mmap) && mmap.get(8) != Some(&b'{') {
            drop(mmap);
            return Ok(WeightFile {
                path: path.to_path_buf(),
                format: Format::Pickle(PickleFile::open(path)?),
            });
        }
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::BadSafetensors {
            file: path.to_path_buf(),
            reason: describe(&e),
        })?;
        Ok(WeightFile {
            path: path.to_path_buf(),
            format: Format::Safetensors {
                mmap,
                data_start: 8 + n,
                meta,
            },
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file is a PyTorch pickle checkpoint.
    pub fn is_pickle(&self) -> bool {
        matches!(self.format, Format::Pickle(_))
    }

    /// The safetensors `__metadata__` string map (empty when absent, and for pickles).
    pub fn metadata(&self) -> HashMap<String, String> {
        match &self.format {
            Format::Safetensors { meta, .. } => meta.metadata().clone().unwrap_or_default(),
            Format::Pickle(_) => HashMap::new(),
        }
    }

    /// The names of all tensors in the file.
    pub fn names(&self) -> Vec<String> {
        match &self.format {
            Format::Safetensors { meta, .. } => meta.tensors().into_keys().collect(),
            Format::Pickle(p) => p.names(),
        }
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.format {
            Format::Safetensors { meta, .. } => meta.info(name).map(|i| i.shape.clone()),
            Format::Pickle(p) => p.shape(name),
        }
    }

    /// Loads tensor `name` in its stored dtype onto `device`; a NaN or an infinity in it is an
    /// error naming the file and tensor.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (dtype, shape, bytes) = match &self.format {
            Format::Safetensors { mmap, data_start, meta } => {
                let info = meta.info(name).ok_or_else(|| Error::MissingTensor {
                    file: self.path.clone(),
                    name: name.to_string(),
                })?;
                let (dtype, bytes) = self.safetensors_bytes(name, info, mmap, *data_start)?;
                (dtype, info.shape.clone(), std::borrow::Cow::Borrowed(bytes))
            }
            Format::Pickle(p) => p.bytes(name)?,
        };
        // One pass over the bytes the copy below reads anyway: a NaN or infinity in a weight or
        // an input only shows up later as a black image or a `null` loss.
        if let Some((count, first, value)) = non_finite(&bytes, dtype) {
            return Err(Error::NonFinite {
                subject: format!("{}: {name}", self.path.display()),
                count,
                first,
                value,
            });
        }
        let t = Tensor::from_raw_buffer(&bytes, dtype, &shape, &Device::Cpu)?;
        Ok(t.to_device(device)?)
    }

    fn safetensors_bytes<'a>(
        &self,
        name: &str,
        info: &TensorInfo,
        mmap: &'a memmap2::Mmap,
        data_start: usize,
    ) -> Result<(DType, &'a [u8])> {
        let dtype = convert_dtype(info.dtype).ok_or_else(|| Error::BadSafetensors {
            file: self.path.clone(),
            reason: format!("{name}: unsupported dtype {:?}", info.dtype),
        })?;
        let (s, e) = info.data_offsets;
        Ok((dtype, &mmap[data_start + s..data_start + e]))
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
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

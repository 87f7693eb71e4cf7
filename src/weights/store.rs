//! Weight files ([`WeightFile`]: safetensors, or PyTorch pickles), one or several (shards), with
//! shape checks and a record of which tensors were read, so that a loader can report tensors the
//! model did not use.
//!
//! A store can also present *views* ([`TensorStore::from_views`]): tensors under our (diffusers)
//! names that are read from a file tensor of another name through a [`ViewTransform`] (reshape,
//! slice, transpose), as single-file checkpoints need (see [`super::single_file`]). The used-key
//! audit of such a store counts the file's tensors: one read through any view counts as used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::WeightFile;
use crate::{Error, Result};

/// The exponent bits of each float dtype (all ones: infinity or NaN) and its width in bytes;
/// `None` for integer dtypes, whose values are always finite.
fn exponent_mask(dtype: DType) -> Option<(u64, usize)> {
    match dtype {
        DType::F16 => Some((0x7c00, 2)),
        DType::BF16 => Some((0x7f80, 2)),
        DType::F32 => Some((0x7f80_0000, 4)),
        DType::F64 => Some((0x7ff0_0000_0000_0000, 8)),
        _ => None,
    }
}

/// The NaN and infinite values among little-endian `bytes` of `dtype`: `(count, index of the
/// first, its value)`, or `None` when every value is finite.
pub(crate) fn non_finite(bytes: &[u8], dtype: DType) -> Option<(usize, usize, f64)> {
    let (mask, width) = exponent_mask(dtype)?;
    let count = match width {
        2 => count_exponent_ones::<2>(bytes, mask),
        4 => count_exponent_ones::<4>(bytes, mask),
        _ => count_exponent_ones::<8>(bytes, mask),
    };
    if count == 0 {
        return None;
    }
    let bits: Vec<u64> = bytes.chunks_exact(width).map(word).collect();
    let first = bits.iter().position(|b| b & mask == mask).expect("count > 0");
    let sign_bit = 1u64 << (8 * width - 1);
    let value = match bits[first] {
        b if b & !mask & !sign_bit != 0 => f64::NAN,
        b if b & sign_bit != 0 => f64::NEG_INFINITY,
        _ => f64::INFINITY,
    };
    Some((count, first, value))
}

/// One little-endian value of up to 8 bytes, zero-extended.
fn word(c: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..c.len()].copy_from_slice(c);
    u64::from_le_bytes(b)
}

/// How many `W`-byte values have every bit of `mask` set; a constant width and no early exit
/// let the loop vectorise, and blocks run on every thread (a weight file is scanned at about
/// memory speed).
fn count_exponent_ones<const W: usize>(bytes: &[u8], mask: u64) -> usize {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 20;
    let count = |block: &[u8]| -> usize {
        block
            .chunks_exact(W)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..W].copy_from_slice(&c[..W]);
                usize::from(u64::from_le_bytes(b) & mask == mask)
            })
            .sum()
    };
    if bytes.len() <= BLOCK {
        count(bytes)
    } else {
        // BLOCK is a multiple of every width, so no value straddles two blocks.
        bytes.par_chunks(BLOCK).map(count).sum()
    }
}

/// Fails with [`Error::NonFinite`] naming `subject()` when `t` holds a NaN or an infinity. One
/// reduction on `t`'s device; the values are copied to the host only when one is found.
pub fn check_finite(t: &Tensor, subject: impl FnOnce() -> String) -> Result<()> {
    let t = t.detach();
    let sum = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(());
    }
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    match non_finite(&bytes, DType::F32) {
        Some((count, first, value)) => Err(Error::NonFinite {
            subject: subject(),
            count,
            first,
            value,
        }),
        // Finite values whose sum overflows f32: large, but not what this check is for.
        None => Ok(()),
    }
}

/// How a view's tensor is made from the file tensor it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewTransform {
    /// The file tensor as stored.
    Identity,
    /// The same elements in another shape, e.g. a 1x1 convolution weight `[C, C, 1, 1]` read as a
    /// linear weight `[C, C]`.
    Reshape(Vec<usize>),
    /// `len` entries from `start` along `dim`, e.g. the query third of a fused `[3D, D]` projection.
    Narrow {
        /// The sliced dimension.
        dim: usize,
        /// First index taken.
        start: usize,
        /// Number of indices taken.
        len: usize,
    },
    /// A matrix `[R, C]` read transposed as `[C, R]` (OpenCLIP keeps its text projection as the `P`
    /// of `x @ P`; a linear layer's weight is `P^T`).
    Transpose,
}

impl ViewTransform {
    /// The shape this transform gives a tensor of shape `src`, or why it cannot apply.
    pub fn shape(&self, src: &[usize]) -> std::result::Result<Vec<usize>, String> {
        match self {
            ViewTransform::Identity => Ok(src.to_vec()),
            ViewTransform::Reshape(to) => {
                let (a, b) = (src.iter().product::<usize>(), to.iter().product::<usize>());
                if a == b {
                    Ok(to.clone())
                } else {
                    Err(format!(
                        "cannot reshape {src:?} ({a} elements) to {to:?} ({b} elements)"
                    ))
                }
            }
            ViewTransform::Narrow { dim, start, len } => match src.get(*dim) {
                Some(&n) if start + len <= n => {
                    let mut out = src.to_vec();
                    out[*dim] = *len;
                    Ok(out)
                }
                _ => Err(format!(
                    "cannot take {len} entries from {start} along dim {dim} of {src:?}"
                )),
            },
            ViewTransform::Transpose => match src {
                [r, c] => Ok(vec![*c, *r]),
                _ => Err(format!("cannot transpose a tensor of shape {src:?} (not a matrix)")),
            },
        }
    }

    fn apply(&self, t: Tensor) -> Result<Tensor> {
        Ok(match self {
            ViewTransform::Identity => t,
            ViewTransform::Reshape(to) => t.reshape(to.as_slice())?,
            ViewTransform::Narrow { dim, start, len } => t.narrow(*dim, *start, *len)?.contiguous()?,
            ViewTransform::Transpose => t.t()?.contiguous()?,
        })
    }
}

/// A tensor a store presents under our name: file tensor `source` through `transform`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorView {
    /// The file tensor read.
    pub source: String,
    /// How it becomes our tensor.
    pub transform: ViewTransform,
}

/// What [`TensorStore::from_views`] presents and answers for.
#[derive(Debug, Clone, Default)]
pub struct ViewSpec {
    /// Our names and where each comes from.
    pub views: BTreeMap<String, TensorView>,
    /// The file tensors this store answers for in the used-key audit (a component's whole key
    /// prefix, so that a file tensor no view reads is reported). Views' sources are added.
    pub scope: BTreeSet<String>,
    /// Tensors of `scope` expected to go unused, each with the reason: the explicit allow-list.
    pub skipped: BTreeMap<String, String>,
    /// What part of the file the store is, for errors: `"unet (model.diffusion_model.*)"`.
    pub component: String,
}

/// A view store's map, with each view's shape.
struct Views {
    map: HashMap<String, (TensorView, Vec<usize>)>,
    skipped: BTreeMap<String, String>,
    component: String,
}

/// A set of safetensors files seen as one checkpoint (a single file or the shards of one), or
/// views with our names over part of one file ([`TensorStore::from_views`]).
pub struct TensorStore {
    label: PathBuf,
    files: Vec<Arc<WeightFile>>,
    /// File tensor names (the audit's domain) to their file.
    location: HashMap<String, usize>,
    views: Option<Views>,
    /// File tensor names read so far.
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
            let f = WeightFile::open(p)?;
            for name in f.names() {
                if location.insert(name.clone(), i).is_some() {
                    return Err(Error::BadSafetensors {
                        file: p.clone(),
                        reason: format!("tensor {name} is also in another shard"),
                    });
                }
            }
            files.push(Arc::new(f));
        }
        Ok(TensorStore {
            label,
            files,
            location,
            views: None,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// A store over `file` that presents `spec.views` under our names, checks each view against
    /// the file (its source exists, its transform fits the stored shape) and audits the file
    /// tensors of `spec.scope`. Tensors load lazily, on [`TensorStore::get`].
    pub fn from_views(file: Arc<WeightFile>, spec: ViewSpec) -> Result<Self> {
        let path = file.path().to_path_buf();
        let mut location = HashMap::new();
        for name in spec.scope.iter().chain(spec.views.values().map(|v| &v.source)) {
            if file.shape(name).is_none() {
                return Err(Error::MissingTensor {
                    file: path.clone(),
                    name: name.clone(),
                });
            }
            location.insert(name.clone(), 0);
        }
        let mut map = HashMap::with_capacity(spec.views.len());
        for (name, view) in spec.views {
            let src = file.shape(&view.source).expect("checked above");
            let shape = view.transform.shape(&src).map_err(|why| Error::BadSafetensors {
                file: path.clone(),
                reason: format!("{} cannot be read as {name}: {why}", view.source),
            })?;
            map.insert(name, (view, shape));
        }
        Ok(TensorStore {
            label: path,
            files: vec![file],
            location,
            views: Some(Views {
                map,
                skipped: spec.skipped,
                component: spec.component,
            }),
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// Opens a single file.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open(path, &[path.to_path_buf()])
    }

    /// The name used for this checkpoint in errors.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// Whether tensor `name` exists (for a view store: whether a view has this name).
    pub fn contains(&self, name: &str) -> bool {
        match &self.views {
            Some(v) => v.map.contains_key(name),
            None => self.location.contains_key(name),
        }
    }

    /// The shape of `name` as [`TensorStore::get`] gives it, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.views {
            Some(v) => v.map.get(name).map(|(_, shape)| shape.clone()),
            None => self.location.get(name).and_then(|&i| self.files[i].shape(name)),
        }
    }

    /// All tensor names (for a view store: our names), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.views {
            Some(v) => v.map.keys().cloned().collect(),
            None => self.location.keys().cloned().collect(),
        };
        v.sort();
        v
    }

    /// The view behind our name `name`, for a view store.
    pub fn view(&self, name: &str) -> Option<&TensorView> {
        self.views.as_ref()?.map.get(name).map(|(v, _)| v)
    }

    /// The file tensors a view store expects to go unused, with the reason for each (sorted by
    /// name; empty for plain stores), for a warning at load time.
    pub fn skipped(&self) -> Vec<(String, String)> {
        self.views
            .as_ref()
            .map(|v| v.skipped.iter().map(|(k, r)| (k.clone(), r.clone())).collect())
            .unwrap_or_default()
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
        if let Some(views) = &self.views {
            return self.get_view(views, name, expected, dtype, device);
        }
        let &i = self.location.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.label.clone(),
            name: name.to_string(),
        })?;
        let file = &self.files[i];
        if let Some(expected) = expected {
            let got = file.shape(name).expect("name is in the location map");
            if got != expected {
                return Err(Error::ShapeMismatch {
                    file: file.path().to_path_buf(),
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

    fn get_view(
        &self,
        views: &Views,
        name: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (view, shape) = views.map.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.label.clone(),
            name: format!("{name} (no tensor of the {} maps to it)", views.component),
        })?;
        if let Some(expected) = expected {
            if shape.as_slice() != expected {
                return Err(Error::ShapeMismatch {
                    file: self.label.clone(),
                    name: format!("{name} (from {})", view.source),
                    expected: expected.to_vec(),
                    got: shape.clone(),
                });
            }
        }
        let t = view.transform.apply(self.files[0].load(&view.source, device)?)?;
        self.used.lock().expect("used-set lock").insert(view.source.clone());
        Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? })
    }

    /// Names of file tensors never read through [`TensorStore::get`], sorted; for a view store,
    /// those of its scope that no view read and that are not in its allow-list.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().expect("used-set lock");
        let skipped = self.views.as_ref().map(|v| &v.skipped);
        let mut v: Vec<String> = self
            .location
            .keys()
            .filter(|k| !used.contains(*k) && !skipped.is_some_and(|s| s.contains_key(*k)))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Fails if a tensor went unused, except names for which `allowed` returns true (known
    /// non-parameter buffers). For a view store, `allowed` sees the file name and our names of
    /// the views reading it.
    pub fn check_all_used(&self, allowed: impl Fn(&str) -> bool) -> Result<()> {
        let our_names = |file_name: &str| -> Vec<&str> {
            self.views
                .as_ref()
                .map(|v| {
                    v.map
                        .iter()
                        .filter(|(_, (view, _))| view.source == file_name)
                        .map(|(k, _)| k.as_str())
                        .collect()
                })
                .unwrap_or_default()
        };
        let names: Vec<String> = self
            .unused()
            .into_iter()
            .filter(|n| !allowed(n) && !our_names(n).into_iter().any(&allowed))
            .collect();
        if names.is_empty() {
            Ok(())
        } else {
            Err(Error::UnusedTensors {
                file: self.label.clone(),
                names,
            })
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
    check_parent(path)?;
    let tmp = tmp_path(path);
    let write = || -> Result<()> {
        // safetensors writes through a private (0600) temporary file of its own; a file created
        // here gets the mode the user's umask gives any new file, and the result takes it.
        let mode = std::fs::File::create(&tmp)
            .and_then(|f| f.metadata())
            .map_err(|e| Error::io(&tmp, e))?
            .permissions();
        let mut data: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
        for (k, t) in tensors {
            data.push((k, t.to_device(&Device::Cpu)?.contiguous()?));
        }
        let views: Vec<(&String, &Tensor)> = data.iter().map(|(k, t)| (*k, t)).collect();
        safetensors::serialize_to_file(views, metadata, &tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => Error::io(&tmp, e),
            other => Error::BadSafetensors {
                file: path.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        std::fs::set_permissions(&tmp, mode).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Writes `bytes` to `path` through a temporary sibling and a rename, so that no half-written
/// file is ever left at `path` (the temporary file is removed on failure).
pub fn write_atomic(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    check_parent(path)?;
    let tmp = tmp_path(path);
    let r = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Fails, naming the folder, when the folder an output file `path` goes in does not exist (or
/// is a file), so that the error is not about the temporary file written first.
fn check_parent(path: &Path) -> Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: format!("folder for the output file {}", path.display()),
        }),
        _ => Ok(()),
    }
}

/// A temporary sibling of `path` for write-then-rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

//! A folder of VAE latent distributions, so each training image is encoded once and the
//! encodings survive restarts.
//!
//! Layout: `root/<16 hex digits>/` per cache identity (the FNV-1a hash of the identity string the
//! caller gives: the dataset's [`super::PairDataset::fingerprint`], the resolution, the crop mode,
//! the VAE), holding `identity.txt` (that string) and `NNNNN/<key>.safetensors` entries (`NNNNN` =
//! record index / 1000, so no folder holds more than a few thousand files). Each entry holds the
//! f32 tensors `mean` and `std` (`[C, h, w]`) and, in its metadata, the key and the identity it
//! belongs to. Entries are written to a unique temporary file and renamed into place, so readers
//! (other processes included) see whole files or none; two writers of one key both succeed.
//!
//! A key ([`LatentKey`]) is the record index, the side (preferred or rejected), the flip, and
//! optionally the crop offsets and the resolution. Random crops make caching useless (each draw
//! is a new key), so the trainer uses the cache with centre crops only; that choice is the
//! caller's and should be part of the identity.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use super::dataset::fnv1a;
use crate::{Error, Result};

/// Which image a cache entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LatentKey {
    /// Dataset index of the pair.
    pub index: usize,
    /// The preferred (`true`) or the rejected image.
    pub preferred: bool,
    /// Flipped horizontally.
    pub flipped: bool,
    /// Crop offsets `(top, left)` in the resized image, when not implied by the identity.
    pub crop_top_left: Option<(usize, usize)>,
    /// Resolution `(height, width)`, when not implied by the identity.
    pub resolution: Option<(usize, usize)>,
}

impl LatentKey {
    /// Record `index`, the preferred (`true`) or rejected image, flipped or not; crop and
    /// resolution implied by the cache identity.
    pub fn new(index: usize, preferred: bool, flipped: bool) -> Self {
        LatentKey {
            index,
            preferred,
            flipped,
            crop_top_left: None,
            resolution: None,
        }
    }

    /// The key with explicit crop offsets `(top, left)`.
    pub fn with_crop(mut self, top_left: (usize, usize)) -> Self {
        self.crop_top_left = Some(top_left);
        self
    }

    /// The key with an explicit resolution `(height, width)`.
    pub fn with_resolution(mut self, resolution: (usize, usize)) -> Self {
        self.resolution = Some(resolution);
        self
    }

    /// The entry's file name, e.g. `12-w-flip-512x512-c0x64.safetensors`.
    fn file_name(&self) -> String {
        let mut name = format!("{}-{}", self.index, if self.preferred { "w" } else { "l" });
        if self.flipped {
            name.push_str("-flip");
        }
        if let Some((h, w)) = self.resolution {
            name.push_str(&format!("-{h}x{w}"));
        }
        if let Some((y, x)) = self.crop_top_left {
            name.push_str(&format!("-c{y}x{x}"));
        }
        name.push_str(".safetensors");
        name
    }
}

/// The cache folder of one identity. Cheap to share between threads (it holds only paths).
#[derive(Debug, Clone)]
pub struct LatentCache {
    dir: PathBuf,
    identity: String,
    device: Device,
}

/// Distinguishes temporary files of one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(name);
    let result = std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(path, e));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl LatentCache {
    /// Opens (creating) `root/<hash of identity>/`. `identity` must describe everything the
    /// latents depend on: the data (its fingerprint), the preprocessing (resolution, crop mode),
    /// the VAE. An existing folder whose `identity.txt` differs (a hash collision) is an error.
    /// Entries are returned on the CPU; see [`Self::with_device`].
    pub fn open(root: &Path, identity: &str) -> Result<Self> {
        let dir = root.join(format!("{:016x}", fnv1a(identity.as_bytes())));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let id_file = dir.join("identity.txt");
        match std::fs::read_to_string(&id_file) {
            Ok(found) if found == identity => {}
            Ok(found) => {
                return Err(Error::config(
                    &id_file,
                    "identity",
                    format!("latent cache folder belongs to another identity: {found:?}, not {identity:?}"),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomic(&id_file, identity.as_bytes())?,
            Err(e) => return Err(Error::io(&id_file, e)),
        }
        Ok(LatentCache {
            dir,
            identity: identity.to_string(),
            device: Device::Cpu,
        })
    }

    /// The cache returning its tensors on `device` (hits and misses alike).
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The identity's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `key` (which may not exist yet).
    pub fn path(&self, key: &LatentKey) -> PathBuf {
        self.dir.join(format!("{:05}", key.index / 1000)).join(key.file_name())
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: &LatentKey) -> bool {
        self.path(key).is_file()
    }

    /// The cached `(mean, std)` of `key`, or `encode()`'s, stored for next time. Both come back as
    /// f32 on the cache's device with equal shapes (`[C, h, w]`). A cache file that cannot be read
    /// or belongs to another key is an error naming it (delete it to re-encode).
    pub fn get_or_encode(
        &self,
        key: &LatentKey,
        encode: impl FnOnce() -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let path = self.path(key);
        match std::fs::read(&path) {
            Ok(bytes) => return self.load(&path, &bytes, key),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        let (mean, std) = encode()?;
        crate::error::same_shape("latent encoding std", std.dims(), "the mean", mean.dims())?;
        let mean = mean.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
        let std = std.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
        let metadata = HashMap::from([
            ("key".to_string(), key.file_name()),
            ("identity".to_string(), self.identity.clone()),
        ]);
        let bytes = safetensors::serialize([("mean", &mean), ("std", &std)], Some(metadata)).map_err(|e| {
            Error::BadSafetensors {
                file: path.clone(),
                reason: e.to_string(),
            }
        })?;
        let parent = path.parent().expect("entry paths have a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        write_atomic(&path, &bytes)?;
        Ok((mean.to_device(&self.device)?, std.to_device(&self.device)?))
    }

    fn load(&self, path: &Path, bytes: &[u8], key: &LatentKey) -> Result<(Tensor, Tensor)> {
        let bad = |reason: String| Error::BadSafetensors {
            file: path.to_path_buf(),
            reason: format!("{reason} (delete the file to re-encode)"),
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let found = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("key"))
            .cloned()
            .unwrap_or_default();
        if found != key.file_name() {
            return Err(bad(format!("holds key {found:?}, expected {:?}", key.file_name())));
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, &self.device).map_err(|e| bad(e.to_string()))?;
        let get = |name: &str| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| bad(format!("no tensor {name}")))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let (mean, std) = (get("mean")?, get("std")?);
        if mean.dims() != std.dims() {
            return Err(bad(format!(
                "mean {:?} and std {:?} differ in shape",
                mean.dims(),
                std.dims()
            )));
        }
        Ok((mean, std))
    }
}

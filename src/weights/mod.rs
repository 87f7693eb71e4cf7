//! Weights: safetensors files ([`store`]), the cursor models load through ([`VarBuilder`]),
//! and where a pipeline's files are ([`layout`]: diffusers folders, shards, variants, the Hugging
//! Face cache).

#[cfg(feature = "download")]
pub mod hub;
pub mod layout;
pub mod single_file;
pub mod store;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};

pub use store::{save_safetensors, SafetensorsFile, TensorStore};

use crate::rng::Rng;
use crate::Result;

enum Source {
    Store(TensorStore),
    /// Fresh weights: normals scaled by 1/sqrt(fan_in) for matrices and kernels, ones for norm
    /// scales, zeros for biases. For benchmarks and training from scratch.
    Random(Mutex<Rng>),
}

struct Inner {
    source: Source,
    dtype: DType,
    device: Device,
    /// Present when loading for training: every tensor handed out becomes a `Var` recorded here.
    vars: Option<Mutex<Vec<(String, Var)>>>,
}

/// A cursor into a checkpoint's key tree: [`VarBuilder::pp`] steps into a prefix, and
/// [`VarBuilder::get`] loads `prefix.name` with a shape check. Cheap to clone.
#[derive(Clone)]
pub struct VarBuilder {
    inner: Arc<Inner>,
    prefix: String,
}

impl VarBuilder {
    fn with_source(source: Source, dtype: DType, device: &Device, trainable: bool) -> Self {
        let vars = trainable.then(|| Mutex::new(Vec::new()));
        VarBuilder {
            inner: Arc::new(Inner {
                source,
                dtype,
                device: device.clone(),
                vars,
            }),
            prefix: String::new(),
        }
    }

    /// Frozen weights from `store`, converted to `dtype` on `device`.
    pub fn from_store(store: TensorStore, dtype: DType, device: &Device) -> Self {
        Self::with_source(Source::Store(store), dtype, device, false)
    }

    /// Trainable weights from `store`: every tensor becomes a [`Var`], listed by [`VarBuilder::vars`].
    pub fn trainable_from_store(store: TensorStore, dtype: DType, device: &Device) -> Self {
        Self::with_source(Source::Store(store), dtype, device, true)
    }

    /// Freshly initialised weights from `seed` (see the module docs); `trainable` makes them `Var`s.
    pub fn random(seed: u64, dtype: DType, device: &Device, trainable: bool) -> Self {
        Self::with_source(Source::Random(Mutex::new(Rng::new(seed))), dtype, device, trainable)
    }

    /// The cursor one level down: `pp("conv_in")` then `get(.., "weight")` reads `conv_in.weight`.
    pub fn pp(&self, segment: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.prefix)
        };
        VarBuilder {
            inner: self.inner.clone(),
            prefix,
        }
    }

    /// The full name of `name` under this cursor.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The dtype tensors are loaded into.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// Whether `name` exists under this cursor (always true for random weights).
    pub fn contains(&self, name: &str) -> bool {
        match &self.inner.source {
            Source::Store(s) => s.contains(&self.path(name)),
            Source::Random(_) => true,
        }
    }

    /// Loads `name` under this cursor, which must have shape `shape`.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.path(name);
        let t = match &self.inner.source {
            Source::Store(s) => s.get(&full, Some(shape), self.inner.dtype, &self.inner.device)?,
            Source::Random(rng) => {
                let mut rng = rng.lock().expect("rng lock");
                random_init(&mut rng, shape, name, self.inner.dtype, &self.inner.device)?
            }
        };
        Ok(match &self.inner.vars {
            Some(vars) => {
                let var = Var::from_tensor(&t)?;
                let out = var.as_tensor().clone();
                vars.lock().expect("vars lock").push((full, var));
                out
            }
            None => t,
        })
    }

    /// The `Var`s handed out so far, by full name (empty unless built as trainable).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.inner
            .vars
            .as_ref()
            .map(|v| v.lock().expect("vars lock").clone())
            .unwrap_or_default()
    }

    /// The underlying store, if the weights come from files.
    pub fn store(&self) -> Option<&TensorStore> {
        match &self.inner.source {
            Source::Store(s) => Some(s),
            Source::Random(_) => None,
        }
    }
}

fn random_init(rng: &mut Rng, shape: &[usize], name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = if shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        let std = 1.0 / (fan_in.max(1) as f64).sqrt();
        (0..n).map(|_| (rng.normal() * std) as f32).collect()
    } else if name == "bias" {
        vec![0.0; n]
    } else {
        vec![1.0; n]
    };
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

/// How to load a component: dtype, device, weight-file variant, and whether weights become
/// trainable `Var`s.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype weights are converted to.
    pub dtype: DType,
    /// Where the weights go.
    pub device: Device,
    /// Weight-file variant (`fp16` selects `*.fp16.safetensors`), `None` for the plain files.
    pub variant: Option<String>,
    /// Load the weights as trainable `Var`s.
    pub trainable: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
            trainable: false,
        }
    }
}

impl LoadOptions {
    /// A [`VarBuilder`] over `store` with these options.
    pub fn var_builder(&self, store: TensorStore) -> VarBuilder {
        if self.trainable {
            VarBuilder::trainable_from_store(store, self.dtype, &self.device)
        } else {
            VarBuilder::from_store(store, self.dtype, &self.device)
        }
    }

    /// Opens `dir/{stem}*.safetensors` (see [`layout::open_weights`]) as a [`VarBuilder`].
    pub fn open(&self, dir: &std::path::Path, stem: &str) -> Result<VarBuilder> {
        Ok(self.var_builder(layout::open_weights(dir, stem, self.variant.as_deref())?))
    }
}

/// After a model was built from `vb`, fails if the checkpoint holds tensors the model did not
/// read, except those `allowed` (known non-parameter buffers).
pub fn check_all_used(vb: &VarBuilder, allowed: impl Fn(&str) -> bool) -> Result<()> {
    match vb.store() {
        Some(store) => store.check_all_used(allowed),
        None => Ok(()),
    }
}

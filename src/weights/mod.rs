//! Weights: safetensors files and PyTorch pickle checkpoints ([`file`], [`pickle`], [`store`]), the cursor models load through ([`VarBuilder`]),
//! and where a pipeline's files are ([`layout`]: diffusers folders, shards, variants, the Hugging
//! Face cache), and LoRA adapters attached at load time ([`lora`]).

#[cfg(feature = "download")]
pub mod copy;
pub mod file;
pub mod hub;
pub mod layout;
pub mod lora;
pub mod offset;
pub mod pickle;
pub mod single_file;
pub mod store;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};

pub use file::WeightFile;
pub use lora::{AdaptersOff, LoraAdapter, LoraConfig, LoraSource, LoraSwitch};
pub use store::{save_safetensors, TensorStore};

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
    /// Whether blocks built from this builder recompute their activations in the backward pass.
    recompute: Arc<std::sync::atomic::AtomicBool>,
}

/// A LoRA attached to one builder: the source and what the model built from it took.
struct LoraState {
    source: Arc<LoraSource>,
    /// Module path to its adapter and, when trainable, its `Var`s under the file's key names.
    attached: Mutex<BTreeMap<String, Attached>>,
    /// The one switch of every adapter attached here.
    switch: LoraSwitch,
    /// The LDM names of the store's UNet, for kohya files that use them (SDXL).
    ldm: Option<lora::LdmNames>,
}

#[derive(Clone)]
struct Attached {
    adapter: LoraAdapter,
    vars: Vec<(String, Var)>,
}

/// A cursor into a checkpoint's key tree: [`VarBuilder::pp`] steps into a prefix, and
/// [`VarBuilder::get`] loads `prefix.name` with a shape check. With a LoRA attached
/// ([`VarBuilder::with_lora`]), [`VarBuilder::lora`] gives the adapter of the module at the
/// cursor. Cheap to clone.
#[derive(Clone)]
pub struct VarBuilder {
    inner: Arc<Inner>,
    prefix: String,
    lora: Option<Arc<LoraState>>,
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
                recompute: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            }),
            prefix: String::new(),
            lora: None,
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
            lora: self.lora.clone(),
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

    /// The switch, shared by every builder of this model, that turns block recomputation on
    /// ([`crate::nn::checkpoint::Recompute`]).
    pub fn recompute_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.inner.recompute.clone()
    }

    /// The trainable tensors (weights and attached LoRA factors) created so far under this
    /// builder's prefix.
    pub fn trainable_under_prefix(&self) -> Vec<Tensor> {
        let under = |name: &str| {
            self.prefix.is_empty()
                || name
                    .strip_prefix(self.prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        let mut out: Vec<Tensor> = self
            .vars()
            .into_iter()
            .filter(|(name, _)| under(name))
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        if let Some(lora) = &self.lora {
            for (path, attached) in lora.attached.lock().expect("lora lock").iter() {
                if under(path) {
                    out.extend(attached.vars.iter().map(|(_, v)| v.as_tensor().clone()));
                }
            }
        }
        out
    }

    /// The underlying store, if the weights come from files.
    pub fn store(&self) -> Option<&TensorStore> {
        match &self.inner.source {
            Source::Store(s) => Some(s),
            Source::Random(_) => None,
        }
    }

    /// This builder with LoRA adapters from `source` for the modules built through it (the base
    /// weights keep their own trainability; the adapters are `Var`s when `source` is trainable).
    /// Builders made from it by [`VarBuilder::pp`] share what was attached.
    pub fn with_lora(self, source: Arc<LoraSource>) -> VarBuilder {
        let ldm = self.store().map(|s| lora::LdmNames::from_names(&s.names()));
        VarBuilder {
            lora: Some(Arc::new(LoraState {
                source,
                attached: Mutex::new(BTreeMap::new()),
                switch: LoraSwitch::default(),
                ldm,
            })),
            ..self
        }
    }

    /// The attached LoRA source, if any.
    pub fn lora_source(&self) -> Option<&Arc<LoraSource>> {
        self.lora.as_ref().map(|l| &l.source)
    }

    /// The switch of the adapters attached through this builder (and those made from it by
    /// [`VarBuilder::pp`]), if it has a LoRA.
    pub fn lora_switch(&self) -> Option<&LoraSwitch> {
        self.lora.as_ref().map(|l| &l.switch)
    }

    /// The LoRA adapter of the module at this cursor (its path is the prefix, e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), whose base weight has shape
    /// `weight_shape` (`[out, in]` or `[out, in, k, k]`); `None` without a LoRA or when the LoRA
    /// has none for this module. A/B are f32 on the builder's device; a tensor whose shape does not
    /// fit the module is an error naming the key, the file and both shapes. Asking twice for one
    /// module gives the same adapter (the same `Var`s).
    pub fn lora(&self, weight_shape: &[usize]) -> Result<Option<LoraAdapter>> {
        let Some(state) = &self.lora else {
            return Ok(None);
        };
        let mut attached = state.attached.lock().expect("lora lock");
        if let Some(a) = attached.get(&self.prefix) {
            return Ok(Some(a.adapter.clone()));
        }
        let Some(found) = state
            .source
            .adapter(&self.prefix, state.ldm.as_ref(), weight_shape, &self.inner.device)?
        else {
            return Ok(None);
        };
        let adapter = LoraAdapter {
            switch: state.switch.clone(),
            ..found.adapter
        };
        let entry = if state.source.trainable() {
            let mut adapter = adapter;
            let mut vars = Vec::with_capacity(2);
            let [name_a, name_b] = found.names;
            let [stored_a, stored_b] = found.stored;
            for (name, stored, slot) in [(name_a, stored_a, &mut adapter.a), (name_b, stored_b, &mut adapter.b)] {
                let var = Var::from_tensor(&stored)?;
                let t = var.as_tensor();
                *slot = if t.dims() == slot.dims() {
                    t.clone()
                } else {
                    t.reshape(slot.dims())?
                };
                vars.push((name, var));
            }
            Attached { adapter, vars }
        } else {
            Attached {
                adapter,
                vars: Vec::new(),
            }
        };
        let adapter = entry.adapter.clone();
        attached.insert(self.prefix.clone(), entry);
        Ok(Some(adapter))
    }

    /// The trainable LoRA `Var`s attached so far, under the LoRA file's own key names (for a
    /// fresh LoRA, PEFT names `unet.<module>.lora_A.weight` / `.lora_B.weight`), sorted by module,
    /// A before B. Empty without a trainable LoRA.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        self.collect_attached(|_, a| a.vars.clone())
    }

    /// `f`'s items for each attached LoRA (module path, entry), in module order; empty without
    /// a LoRA.
    fn collect_attached<T>(&self, f: impl Fn(&String, &Attached) -> Vec<T>) -> Vec<T> {
        let Some(l) = &self.lora else { return Vec::new() };
        let attached = l.attached.lock().expect("lora lock");
        attached.iter().flat_map(|(m, a)| f(m, a)).collect()
    }

    /// The kohya naming of this builder's UNet for [`lora::save_kohya`]: its LDM names when it is
    /// an SDXL-architecture UNet (as sd-scripts names them), `None` for diffusers paths.
    pub fn kohya_names(&self) -> Option<&lora::LdmNames> {
        self.lora.as_ref()?.ldm.as_ref().filter(|n| n.is_sdxl())
    }

    /// The LoRA adapters attached so far, by module path (sorted), with their current values;
    /// for [`lora::save_peft`] and [`lora::save_kohya`].
    pub fn lora_adapters(&self) -> Vec<(String, LoraAdapter)> {
        self.collect_attached(|m, a| vec![(m.clone(), a.adapter.clone())])
    }

    /// Fails unless every key of the attached LoRA file found a module (or, for a fresh LoRA,
    /// every target matched one); see [`LoraSource::check_attached`]. Ok without a LoRA.
    pub fn check_lora_attached(&self) -> Result<()> {
        match &self.lora {
            Some(l) => {
                let attached = l.attached.lock().expect("lora lock");
                l.source.check_attached(attached.keys(), l.ldm.as_ref())
            }
            None => Ok(()),
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

/// How to load a component: dtype, device, weight-file variant, whether weights become
/// trainable `Var`s, and a LoRA for the UNet.
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
    /// A LoRA attached to the builders of its component only ([`LoraSource::for_store`]: the UNet
    /// or a text encoder, recognised by its tensors; a source from [`LoraSource::from_file_all`]
    /// carries one per component), so one set of options can load a whole pipeline.
    pub lora: Option<Arc<LoraSource>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
            trainable: false,
            lora: None,
        }
    }
}

impl LoadOptions {
    /// A [`VarBuilder`] over `store` with these options; with `lora` attached when `store` holds
    /// the LoRA's component.
    pub fn var_builder(&self, store: TensorStore) -> VarBuilder {
        let lora = self.lora.as_ref().and_then(|l| LoraSource::for_store(l, &store));
        let vb = if self.trainable {
            VarBuilder::trainable_from_store(store, self.dtype, &self.device)
        } else {
            VarBuilder::from_store(store, self.dtype, &self.device)
        };
        match lora {
            Some(l) => vb.with_lora(l),
            None => vb,
        }
    }

    /// These options without a LoRA (for loading a component the LoRA must not reach).
    pub fn without_lora(&self) -> LoadOptions {
        LoadOptions {
            lora: None,
            ..self.clone()
        }
    }

    /// Opens `dir/{stem}*.safetensors` (see [`layout::open_weights`]) as a [`VarBuilder`].
    pub fn open(&self, dir: &std::path::Path, stem: &str) -> Result<VarBuilder> {
        Ok(self.var_builder(layout::open_weights(dir, stem, self.variant.as_deref())?))
    }
}

/// After a model was built from `vb`, fails if the checkpoint holds tensors the model did not
/// read, except those `allowed` (known non-parameter buffers), or if a key of its LoRA found no
/// module ([`VarBuilder::check_lora_attached`]).
pub fn check_all_used(vb: &VarBuilder, allowed: impl Fn(&str) -> bool) -> Result<()> {
    if let Some(store) = vb.store() {
        store.check_all_used(allowed)?;
    }
    vb.check_lora_attached()
}

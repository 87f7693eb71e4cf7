//! LoRA adapters for one model component (the UNet): where they come from ([`LoraSource`]: a
//! file in diffusers/PEFT, old diffusers or kohya form, or fresh trainable weights), and how they
//! are written back ([`save_peft`], [`save_kohya`]) or fused into a checkpoint ([`fuse_store`]).
//!
//! An adapter on a module with weight `W` gives `W x + b + scale * B (A x)` (PEFT semantics: the
//! base output is not scaled), so the fused weight is `W + scale * B @ A`. Linear: A `[r, in]`,
//! B `[out, r]`. Conv2d: A `[r, in, k, k]` (the base conv's stride and padding), B `[out, r, 1, 1]`.
//!
//! Key forms read (diffusers `loaders/lora_pipeline.py`, `utils/state_dict_utils.py`):
//! - PEFT / diffusers: `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight`; the scale
//!   comes from the safetensors metadata entry `lora_adapter_metadata` (the PEFT `LoraConfig` as
//!   JSON with `unet.`-prefixed keys): `lora_alpha / r`, or `/ sqrt(r)` with `use_rslora`, with
//!   `rank_pattern` / `alpha_pattern` overriding per module as PEFT's `get_pattern_key` does (the
//!   first key `k`, in file order, with `module` matching the regex `(.*\.)?(k)$`). Without that
//!   entry, a `unet.<module>.alpha` tensor gives `alpha / r`, else the scale is 1 (alpha = rank).
//! - Old diffusers: `unet.<module>.lora.down.weight` / `.lora.up.weight` (and the older attention
//!   processor form `<attn>.processor.to_q_lora.down.weight`), also without the `unet.` prefix when
//!   the file has no text-encoder keys; scaled as above.
//! - kohya (sd-scripts, A1111, ComfyUI): `lora_unet_<module, dots as underscores>.lora_down.weight`
//!   / `.lora_up.weight` / `.alpha` (scalar); scale `alpha / r`, 1 without `.alpha`. Underscores are
//!   ambiguous, so these keys are matched when a module asks for them. SDXL files name modules by
//!   their LDM path (`lora_unet_input_blocks_4_1_...`), matched through the UNet's [`LdmNames`].
//!
//! A source reads one component's keys: the UNet's (`unet.*`, `lora_unet_*`), the first text
//! encoder's (`text_encoder.*`, kohya `lora_te_*` / `lora_te1_*`, CLIP module paths such as
//! `text_model.encoder.layers.0.self_attn.q_proj`) or SDXL's second (`text_encoder_2.*`,
//! `lora_te2_*`). [`LoraSource::ignored_keys`] lists the other components' keys for a warning.
//! Every other key must be a LoRA tensor of the component, and after a model is built every one of
//! them must have been attached to a module ([`LoraSource::check_attached`]).

mod ldm;
mod parse;
mod save;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::store::TensorStore;
use super::WeightFile;
use crate::rng::Rng;
use crate::{Error, Result};
pub use ldm::LdmNames;
use parse::{parse_file, FileLora};
pub use save::{
    dominant_rank_alpha, kohya_to_module, module_to_kohya, save_kohya, save_kohya_parts, save_peft, save_peft_parts,
    LoraPart,
};

/// The safetensors metadata entry holding the PEFT `LoraConfig` (diffusers' `LORA_ADAPTER_METADATA_KEY`).
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// One module's low-rank update, applied as `scale * B (A x)` next to the module's own output.
/// Tensors are f32 (master weights for training; cast to the input dtype in forward). For a
/// trainable adapter they are the `Var`s' tensors, so optimiser steps show through.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Down projection: `[r, in]` (Linear) or `[r, in, k, k]` (Conv2d).
    pub a: Tensor,
    /// Up projection: `[out, r]` (Linear) or `[out, r, 1, 1]` (Conv2d).
    pub b: Tensor,
    /// The factor on `B A`: `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
    /// Shared by every adapter attached through one [`crate::weights::VarBuilder`].
    pub switch: LoraSwitch,
}

/// Turns a model's LoRA adapters off and on together, as PEFT's `disable_adapter()`: with the
/// adapters off the model computes exactly as its base, which lets a LoRA run use one UNet as
/// both the policy and the frozen reference. Clones share the state; adapters start on.
#[derive(Debug, Clone, Default)]
pub struct LoraSwitch(Arc<AtomicBool>);

impl LoraSwitch {
    /// Whether the adapters apply.
    pub fn is_on(&self) -> bool {
        !self.0.load(Ordering::Acquire)
    }

    /// Switches the adapters off until the returned guard is dropped.
    pub fn off(&self) -> AdaptersOff<'_> {
        self.0.store(true, Ordering::Release);
        AdaptersOff(self)
    }
}

/// The adapters of a [`LoraSwitch`] stay off while this lives.
#[must_use = "the adapters come back on when the guard is dropped"]
#[derive(Debug)]
pub struct AdaptersOff<'a>(&'a LoraSwitch);

impl Drop for AdaptersOff<'_> {
    fn drop(&mut self) {
        (self.0).0.store(false, Ordering::Release);
    }
}

impl LoraAdapter {
    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale * B @ A` in the shape of the base weight (`[out, in]` or `[out, in, k, k]`), f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (a, b) = (self.a.to_dtype(DType::F32)?, self.b.to_dtype(DType::F32)?);
        let r = self.rank();
        let out = b.dims()[0];
        let delta = b.reshape((out, r))?.matmul(&a.flatten_from(1)?)?;
        let mut shape = vec![out];
        shape.extend_from_slice(&a.dims()[1..]);
        Ok(delta.reshape(shape)?.affine(self.scale, 0.0)?)
    }

    /// `W + scale * B @ A`, computed in f32 and returned in `weight`'s dtype.
    pub fn fuse(&self, weight: &Tensor) -> Result<Tensor> {
        let delta = self.delta_weight()?.reshape(weight.dims())?;
        Ok((weight.to_dtype(DType::F32)? + delta)?.to_dtype(weight.dtype())?)
    }
}

/// The modules a fresh LoRA adapts unless told otherwise: the attention projections, as
/// diffusers' DPO and SDXL LoRA scripts target.
pub const DEFAULT_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// The text-encoder modules adapted unless `text_encoder_targets` says otherwise: the attention
/// projections, as diffusers' text-encoder LoRA scripts target.
pub const DEFAULT_TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// A fresh LoRA to train, as diffusers' DPO script makes it (`LoraConfig(r, lora_alpha,
/// init_lora_weights="gaussian", target_modules)`): A ~ N(0, std 1/r), B = 0, so the adapted
/// model starts equal to the base model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r of every adapter.
    pub rank: usize,
    /// alpha; the scale is `alpha / rank`.
    pub alpha: f64,
    /// Modules to adapt, as PEFT matches them: a module matches a target equal to its path or
    /// to a dotted suffix of it (`to_q`, `to_out.0`, `attn1.to_q`, or a full path).
    pub target_modules: Vec<String>,
    /// Seed of A's initialisation; a module's A depends only on the seed and its path.
    pub init_seed: u64,
}

/// Which key form a LoRA file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// `unet.<module>.lora_A.weight` / `.lora_B.weight`.
    Peft,
    /// `unet.<module>.lora.down.weight` / `.lora.up.weight`.
    OldDiffusers,
    /// `lora_unet_<module_underscored>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
}

enum Kind {
    File(FileLora),
    Fresh(LoraConfig),
}

/// Where a component's LoRA adapters come from: a file or a fresh initialisation. Attach it to a
/// builder with [`super::VarBuilder::with_lora`] (or through [`super::LoadOptions::lora`]); the
/// builder then hands each Linear / Conv2d its adapter.
pub struct LoraSource {
    kind: Kind,
    component: String,
    trainable: bool,
    /// The same file's sources for its other components ([`LoraSource::from_file_all`]).
    others: Vec<Arc<LoraSource>>,
    /// A multiplier of every adapter's scale (1; NPO's guidance weight).
    weight: f64,
    /// Frozen sources applied beside this one ([`LoraSource::stacked_with`]).
    stacked: Vec<Arc<LoraSource>>,
}

impl std::fmt::Debug for LoraSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("LoraSource");
        match &self.kind {
            Kind::File(fl) => d
                .field("file", &fl.file.path())
                .field("format", &fl.format)
                .field("adapters", &(fl.by_module.len() + fl.by_kohya.len())),
            Kind::Fresh(cfg) => d.field("fresh", cfg),
        };
        d.field("component", &self.component)
            .field("trainable", &self.trainable)
            .field("others", &self.others)
            .field("stacked", &self.stacked)
            .finish()
    }
}

/// What [`LoraSource::adapter`] found for a module.
pub(crate) struct FoundAdapter {
    /// The adapter, f32, shaped for the module (`[r, in]` for a Linear even when stored 1x1-conv shaped).
    pub adapter: LoraAdapter,
    /// A's and B's key names, under which trainable copies are listed.
    pub names: [String; 2],
    /// A and B as stored (shapes as in the file), for making `Var`s.
    pub stored: [Tensor; 2],
}

impl FoundAdapter {
    /// One adapter computing this one's update plus `other`'s: A stacked over A', B beside B'
    /// (each B times its scale), scale 1, so that `B A x` is the sum of both. Frozen only: the
    /// names and stored tensors stay this adapter's.
    fn beside(self, other: FoundAdapter) -> Result<FoundAdapter> {
        let (x, y) = (&self.adapter, &other.adapter);
        let a = Tensor::cat(&[&x.a, &y.a], 0)?;
        let b = Tensor::cat(&[(&x.b * x.scale)?, (&y.b * y.scale)?], 1)?;
        Ok(FoundAdapter {
            adapter: LoraAdapter {
                a,
                b,
                scale: 1.0,
                switch: LoraSwitch::default(),
            },
            ..self
        })
    }
}

impl LoraSource {
    /// Reads a LoRA file for `component` (`"unet"`, `"text_encoder"`, `"text_encoder_2"`): PEFT, old diffusers or kohya keys (see
    /// the module docs). Errors name the file and key: a truncated file, an unknown or unsupported
    /// key (DoRA, LyCORIS), an A without B, ranks of A and B that differ, bad metadata.
    /// `trainable` makes the adapters `Var`s when attached.
    pub fn from_file(path: &Path, component: &str, trainable: bool) -> Result<Self> {
        if !parse::COMPONENTS.iter().any(|(c, _, _)| *c == component) {
            return Err(Error::input(
                "LoRA component",
                format!("expected unet, text_encoder or text_encoder_2, got {component:?}"),
            ));
        }
        let file = WeightFile::open(path)?;
        let fl = parse_file(file, component)?;
        Ok(LoraSource {
            kind: Kind::File(fl),
            component: component.to_string(),
            trainable,
            others: Vec::new(),
            weight: 1.0,
            stacked: Vec::new(),
        })
    }

    /// Reads every component a LoRA file has keys for (UNet, `text_encoder`, `text_encoder_2`; a
    /// file of unprefixed keys is the UNet's): the first as this source, the others as its
    /// [`LoraSource::others`], so that one [`super::LoadOptions`] applies each to its component
    /// of a pipeline ([`LoraSource::for_store`]).
    pub fn from_file_all(path: &Path, trainable: bool) -> Result<Self> {
        let names = WeightFile::open(path)?.names();
        let mut present: Vec<&str> = parse::COMPONENTS
            .iter()
            .map(|(c, _, _)| *c)
            .filter(|c| names.iter().any(|n| parse::component_of(n) == Some(*c)))
            .collect();
        if present.is_empty() {
            present.push("unet");
        }
        let mut sources = present
            .into_iter()
            .map(|c| Self::from_file(path, c, trainable))
            .collect::<Result<Vec<_>>>()?;
        let mut first = sources.remove(0);
        first.others = sources.into_iter().map(Arc::new).collect();
        Ok(first)
    }

    /// The sources of the file's other components (see [`LoraSource::from_file_all`]).
    pub fn others(&self) -> &[Arc<LoraSource>] {
        &self.others
    }

    /// The source among `source` and its [`LoraSource::others`] whose component `store` holds
    /// ([`LoraSource::applies_to`]), if any.
    pub fn for_store(source: &Arc<LoraSource>, store: &TensorStore) -> Option<Arc<LoraSource>> {
        std::iter::once(source)
            .chain(source.others.iter())
            .find(|s| s.applies_to(store))
            .cloned()
    }

    /// This source with every adapter's scale multiplied by `weight` (Diffusion-NPO's weight of
    /// its adapter; 0 leaves the base weights exactly).
    pub fn with_weight(self, weight: f64) -> Self {
        LoraSource { weight, ..self }
    }

    /// This source with `other`'s adapters applied beside its own, each module's update the sum
    /// of both (as diffusers' `set_adapters` with two adapters). Both must be frozen and for the
    /// same component. Diffusion-NPO's negative branch is the model with its positive LoRA and
    /// the NPO adapter together (the official `gen.py`).
    pub fn stacked_with(mut self, other: Arc<LoraSource>) -> Result<Self> {
        if self.trainable || other.trainable {
            return Err(Error::input("LoRA stack", "only frozen LoRAs can be applied together"));
        }
        if self.component != other.component {
            return Err(Error::input(
                "LoRA stack",
                format!(
                    "adapters for the {} and the {} cannot be stacked",
                    self.component, other.component
                ),
            ));
        }
        self.stacked.push(other);
        Ok(self)
    }

    /// A fresh, always trainable UNet LoRA (see [`LoraConfig`]).
    pub fn fresh(cfg: &LoraConfig) -> Self {
        Self::fresh_for(cfg, "unet")
    }

    /// A fresh, always trainable LoRA whose `Var`s are named `{prefix}.<module>.lora_A.weight`
    /// (PEFT's causal-LM prefix is `base_model.model`). Attach it with
    /// [`super::VarBuilder::with_lora`].
    pub fn fresh_for(cfg: &LoraConfig, prefix: &str) -> Self {
        LoraSource {
            kind: Kind::Fresh(cfg.clone()),
            component: prefix.to_string(),
            trainable: true,
            others: Vec::new(),
            weight: 1.0,
            stacked: Vec::new(),
        }
    }

    /// The component adapted (`"unet"`).
    pub fn component(&self) -> &str {
        &self.component
    }

    /// Whether attached adapters become `Var`s.
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// The file read, for a file source.
    pub fn path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::File(fl) => Some(fl.file.path()),
            Kind::Fresh(_) => None,
        }
    }

    /// The file's key form, for a file source.
    pub fn format(&self) -> Option<LoraFormat> {
        match &self.kind {
            Kind::File(fl) => Some(fl.format),
            Kind::Fresh(_) => None,
        }
    }

    /// The fresh configuration, for a fresh source.
    pub fn fresh_config(&self) -> Option<&LoraConfig> {
        match &self.kind {
            Kind::Fresh(cfg) => Some(cfg),
            Kind::File(_) => None,
        }
    }

    /// Keys of the file that are for other components, sorted; this source does not apply them.
    pub fn ignored_keys(&self) -> &[String] {
        match &self.kind {
            Kind::File(fl) => &fl.ignored,
            Kind::Fresh(_) => &[],
        }
    }

    /// The file's keys for this component (A, B and alpha tensors), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.kind {
            Kind::File(fl) => fl
                .by_module
                .values()
                .chain(fl.by_kohya.values())
                .flat_map(|e| e.keys().cloned())
                .collect(),
            Kind::Fresh(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// Whether `store` holds this source's component: for `"unet"`, a UNet2DConditionModel (its
    /// `conv_in.weight` and `time_embedding.linear_1.weight`); for `"text_encoder"` a CLIP text
    /// model without `text_projection.weight`, for `"text_encoder_2"` one with it. This lets one
    /// [`super::LoadOptions`] load a whole pipeline with the LoRA reaching only its component.
    pub fn applies_to(&self, store: &TensorStore) -> bool {
        let clip = ["", "text_model."]
            .iter()
            .any(|p| store.contains(&format!("{p}embeddings.token_embedding.weight")));
        // In SD and SDXL pipelines the first encoder is a CLIPTextModel, the second a
        // CLIPTextModelWithProjection.
        let projection = store.contains("text_projection.weight");
        match self.component.as_str() {
            "unet" => store.contains("conv_in.weight") && store.contains("time_embedding.linear_1.weight"),
            "text_encoder" => clip && !projection,
            "text_encoder_2" => clip && projection,
            _ => false,
        }
    }

    /// The adapter for `module` (a diffusers path such as `down_blocks.0.attentions.0.
    /// transformer_blocks.0.attn1.to_q`) whose base weight has shape `weight_shape` (`[out, in]` or
    /// `[out, in, k, k]`), as f32 on `device`; `None` when the source has none for it. A tensor
    /// whose shape does not fit is an error naming the key, the file and both shapes.
    pub(crate) fn adapter(
        &self,
        module: &str,
        ldm: Option<&LdmNames>,
        weight_shape: &[usize],
        device: &Device,
    ) -> Result<Option<FoundAdapter>> {
        let mut found = self.own_adapter(module, ldm, weight_shape, device)?;
        for other in &self.stacked {
            if let Some(more) = other.adapter(module, ldm, weight_shape, device)? {
                found = Some(match found {
                    Some(f) => f.beside(more)?,
                    None => more,
                });
            }
        }
        Ok(found)
    }

    /// [`LoraSource::adapter`] of this source alone, without its stacked ones.
    fn own_adapter(
        &self,
        module: &str,
        ldm: Option<&LdmNames>,
        weight_shape: &[usize],
        device: &Device,
    ) -> Result<Option<FoundAdapter>> {
        match &self.kind {
            Kind::File(fl) => {
                let Some(entry) = file_entry(fl, module, ldm) else {
                    return Ok(None);
                };
                let a = fl.file.load(&entry.a, device)?.to_dtype(DType::F32)?;
                let b = fl.file.load(&entry.b, device)?.to_dtype(DType::F32)?;
                let (ea, eb) = adapter_shapes(weight_shape, entry.rank);
                let path = fl.file.path();
                let a_fit = fit(&a, &ea, path, &entry.a)?;
                let b_fit = fit(&b, &eb, path, &entry.b)?;
                Ok(Some(FoundAdapter {
                    adapter: LoraAdapter {
                        a: a_fit,
                        b: b_fit,
                        scale: entry.scale * self.weight,
                        switch: LoraSwitch::default(),
                    },
                    names: [entry.a.clone(), entry.b.clone()],
                    stored: [a, b],
                }))
            }
            Kind::Fresh(cfg) => {
                if !cfg.target_modules.iter().any(|t| module_matches(module, t)) {
                    return Ok(None);
                }
                let (ea, eb) = adapter_shapes(weight_shape, cfg.rank);
                let mut rng = Rng::new(cfg.init_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ fnv1a(module));
                let std = 1.0 / cfg.rank as f64;
                let n: usize = ea.iter().product();
                let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
                let a = Tensor::from_vec(data, ea.as_slice(), device)?;
                let b = Tensor::zeros(eb.as_slice(), DType::F32, device)?;
                let names = [
                    format!("{}.{module}.lora_A.weight", self.component),
                    format!("{}.{module}.lora_B.weight", self.component),
                ];
                Ok(Some(FoundAdapter {
                    adapter: LoraAdapter {
                        a: a.clone(),
                        b: b.clone(),
                        scale: cfg.alpha / cfg.rank as f64 * self.weight,
                        switch: LoraSwitch::default(),
                    },
                    names,
                    stored: [a, b],
                }))
            }
        }
    }

    /// The file keys `module`'s adapter reads (A, B, alpha), or for a fresh source the module itself.
    pub(crate) fn keys_for(&self, module: &str, ldm: Option<&LdmNames>) -> Vec<String> {
        match &self.kind {
            Kind::File(fl) => file_entry(fl, module, ldm)
                .map(|e| e.keys().cloned().collect())
                .unwrap_or_default(),
            Kind::Fresh(_) => vec![module.to_string()],
        }
    }

    /// After a model was built: fails unless every key of the file was attached to a module, or,
    /// for a fresh source, every target matched a module. `attached` holds the modules that got
    /// an adapter; `ldm` is the UNet's name map, which LDM-named kohya files need.
    pub fn check_attached<'a>(
        &self,
        attached: impl IntoIterator<Item = &'a String>,
        ldm: Option<&LdmNames>,
    ) -> Result<()> {
        let attached: BTreeSet<&String> = attached.into_iter().collect();
        for other in &self.stacked {
            other.check_attached(attached.iter().copied(), ldm)?;
        }
        match &self.kind {
            Kind::File(fl) => {
                let used: BTreeSet<String> = attached.iter().flat_map(|m| self.keys_for(m, ldm)).collect();
                let unattached: Vec<String> = self.keys().into_iter().filter(|k| !used.contains(k)).collect();
                if unattached.is_empty() {
                    Ok(())
                } else {
                    Err(Error::UnusedTensors {
                        file: fl.file.path().to_path_buf(),
                        names: unattached,
                    })
                }
            }
            Kind::Fresh(cfg) => {
                let missing: Vec<&String> = cfg
                    .target_modules
                    .iter()
                    .filter(|t| !attached.iter().any(|m| module_matches(m, t)))
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(Error::input(
                        "LoRA target_modules",
                        format!(
                            "{missing:?} matched no Linear or Conv2d module of the {}",
                            self.component
                        ),
                    ))
                }
            }
        }
    }

    /// Whether the file names modules by LDM path (an SDXL kohya file), which only a UNet's
    /// [`LdmNames`] turn into module paths.
    pub fn has_ldm_names(&self) -> bool {
        matches!(&self.kind, Kind::File(fl) if fl.ldm)
    }

    /// A file's adapters by module path, for conversion. kohya names are turned back into paths
    /// with the diffusers UNet's segment names (`down_blocks`, `to_out`, ...), or for an LDM-named
    /// file through `ldm`, the base UNet's map, which it then needs.
    pub fn file_adapters(&self, ldm: Option<&LdmNames>, device: &Device) -> Result<Vec<(String, LoraAdapter)>> {
        let Kind::File(fl) = &self.kind else {
            return Err(Error::input("LoRA source", "a fresh LoRA has no file adapters"));
        };
        let path = fl.file.path();
        let kohya_module = |k: &String| -> Result<String> {
            if !fl.ldm {
                return Ok(kohya_to_module(k));
            }
            let Some(names) = ldm else {
                return Err(Error::input(
                    path.display().to_string(),
                    "kohya LoRA with LDM (SDXL) module names: the base UNet is needed to map its block numbers",
                ));
            };
            names.from_kohya(k).ok_or_else(|| {
                Error::input(
                    path.display().to_string(),
                    format!("lora_unet_{k}: names no module of the base UNet"),
                )
            })
        };
        let mut out = Vec::new();
        let mut entries: Vec<(String, &parse::Entry)> = fl.by_module.iter().map(|(m, e)| (m.clone(), e)).collect();
        for (k, e) in &fl.by_kohya {
            entries.push((kohya_module(k)?, e));
        }
        for (module, e) in entries {
            let a = fl.file.load(&e.a, device)?.to_dtype(DType::F32)?;
            let b = fl.file.load(&e.b, device)?.to_dtype(DType::F32)?;
            out.push((
                module,
                LoraAdapter {
                    a,
                    b,
                    scale: e.scale,
                    switch: LoraSwitch::default(),
                },
            ));
        }
        out.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(out)
    }
}

/// The file's entry for `module`: under its path, or under its kohya name (the LDM one, through
/// `ldm`, for an LDM-named file). A CLIP text model's modules are also looked up with the
/// `text_model.` prefix toggled: transformers 4 saves it, transformers 5 does not, and kohya names
/// always have it.
fn file_entry<'a>(fl: &'a FileLora, module: &str, ldm: Option<&LdmNames>) -> Option<&'a parse::Entry> {
    let twin = match module.strip_prefix("text_model.") {
        Some(m) => m.to_string(),
        None => format!("text_model.{module}"),
    };
    let candidates = if fl.text_encoder {
        vec![module, twin.as_str()]
    } else {
        vec![module]
    };
    candidates.into_iter().find_map(|m| {
        if let Some(e) = fl.by_module.get(m) {
            return Some(e);
        }
        let name = if fl.ldm { ldm?.to_kohya(m)? } else { module_to_kohya(m) };
        fl.by_kohya.get(&name)
    })
}

/// PEFT's target rule: `module` is `target` or ends with `.target`.
fn module_matches(module: &str, target: &str) -> bool {
    module == target || module.strip_suffix(target).is_some_and(|head| head.ends_with('.'))
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A's and B's shapes for a base weight of `weight_shape` and rank `r`.
fn adapter_shapes(weight_shape: &[usize], r: usize) -> (Vec<usize>, Vec<usize>) {
    let out = weight_shape[0];
    let mut a = vec![r];
    a.extend_from_slice(&weight_shape[1..]);
    let b = if weight_shape.len() == 4 {
        vec![out, r, 1, 1]
    } else {
        vec![out, r]
    };
    (a, b)
}

/// `t` reshaped to `expected` when it is the same tensor up to trailing 1x1 dims (a 1x1-conv LoRA
/// on a linear layer or the reverse), else a shape error naming `key` in `file`.
fn fit(t: &Tensor, expected: &[usize], file: &Path, key: &str) -> Result<Tensor> {
    let strip = |s: &[usize]| -> Vec<usize> {
        let mut s = s.to_vec();
        while s.len() > 2 && s.last() == Some(&1) {
            s.pop();
        }
        s
    };
    if t.dims() == expected {
        Ok(t.clone())
    } else if strip(t.dims()) == strip(expected) {
        Ok(t.reshape(expected)?)
    } else {
        Err(Error::ShapeMismatch {
            file: file.to_path_buf(),
            name: key.to_string(),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        })
    }
}

/// Every tensor of `store` as `dtype` on `device`, with each module that `source` adapts fused
/// (`W + scale * B @ A`, computed in f32): a merged checkpoint under the store's own names. Fails
/// unless every LoRA key found a module of the store.
pub fn fuse_store(
    store: &TensorStore,
    source: &LoraSource,
    dtype: DType,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let names = store.names();
    let ldm = LdmNames::from_names(&names);
    let mut attached = Vec::new();
    let mut out = Vec::new();
    for name in names {
        let mut t = store.get(&name, None, DType::F32, device)?;
        if let Some(module) = name.strip_suffix(".weight") {
            if matches!(t.rank(), 2 | 4) {
                if let Some(found) = source.adapter(module, Some(&ldm), t.dims(), device)? {
                    t = found.adapter.fuse(&t)?;
                    attached.push(module.to_string());
                }
            }
        }
        out.push((name, t.to_dtype(dtype)?));
    }
    source.check_attached(&attached, Some(&ldm))?;
    Ok(out)
}

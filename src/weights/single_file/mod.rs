//! Single-file Stable Diffusion checkpoints (the one `.safetensors` A1111 and ComfyUI keep, or a
//! `.ckpt` read by the restricted unpickler of [`super::pickle`]) in the
//! original CompVis / Stability ("LDM") key layout, seen as per-component [`TensorStore`]s with our
//! (diffusers) names, so that the models load from them as from a diffusers folder.
//! Counterpart: `diffusers/loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`).
//!
//! Layouts, by architecture ([`Architecture::detect`] reads it off the keys):
//! - UNet `model.diffusion_model.*`: `input_blocks.0.0` is `conv_in`; then per down block
//!   `layers_per_block` entries (`.0` resnet, `.1` attention in cross-attention blocks) and, except
//!   in the last block, a downsampler `.0.op`; `middle_block.{0,1,2}` (resnet, attention, resnet);
//!   `output_blocks` hold `layers_per_block + 1` entries per up block (`.0` resnet, `.1` attention)
//!   with the upsampler at `.1.conv`, or `.2.conv` after an attention; `time_embed.{0,2}`,
//!   `label_emb.0.{0,2}` (SDXL's `add_embedding`), `out.{0,2}`. Resnet leaves are `in_layers.{0,2}`,
//!   `out_layers.{0,3}`, `emb_layers.1`, `skip_connection`. Transformer blocks keep our names.
//! - VAE `first_stage_model.*`: `{en,de}coder.{down,up}.N.block.M`, the decoder's `up.N` counted
//!   from the lowest resolution (reversed against `up_blocks`), `nin_shortcut`, `downsample.conv`,
//!   `upsample.conv`, `mid.block_{1,2}`, `mid.attn_1.{norm,q,k,v,proj_out}` whose weights are 1x1
//!   convolutions `[C, C, 1, 1]` (read as linear `[C, C]`), `norm_out`.
//! - Text encoders in transformers' layout (SD 1.x `cond_stage_model.transformer.*`, SDXL's first
//!   `conditioner.embedders.0.transformer.*`): `text_model.*` as is.
//! - OpenCLIP text encoders (SD 2.x `cond_stage_model.model.*`, SDXL's second
//!   `conditioner.embedders.1.model.*`): `token_embedding.weight`, `positional_embedding`,
//!   `ln_final`, `transformer.resblocks.N.{ln_1, ln_2, mlp.c_fc, mlp.c_proj, attn.out_proj}`, the
//!   fused `attn.in_proj_{weight,bias}` `[3D, D]` (read as three slices: q, k, v) and
//!   `text_projection`, the `P` of `x @ P` (read transposed as our linear weight).
//!
//! Every file tensor belongs to a component or to an explicit, commented allow-list (EMA weights,
//! the LDM trainer's schedule buffers, `position_ids`, OpenCLIP's `logit_scale`, SD 2.x's unused
//! projection and last block); anything else is reported, by [`SingleFile::open`] for tensors
//! outside every component and by each component store's used-key audit for the rest.
//! [`SingleFile::skipped`] lists what was skipped, with reasons, for a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

mod open_clip;
mod unet;
mod vae;

use open_clip::{open_clip_name, OpenClip};
use unet::{unet_name, unet_rules, UnetShape};
use vae::vae_name;

use super::store::{TensorStore, TensorView, ViewSpec, ViewTransform};
use super::WeightFile;
use crate::{Error, Result};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_TEXT: &str = "cond_stage_model.transformer.";
const SD2_TEXT: &str = "cond_stage_model.model.";
const SDXL_TEXT: &str = "conditioner.embedders.0.transformer.";
const SDXL_TEXT_2: &str = "conditioner.embedders.1.model.";

/// The probes [`Architecture::detect`] looks for: one tensor per text encoder.
const SD1_PROBE: &str = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
const SD2_PROBE: &str = "cond_stage_model.model.token_embedding.weight";
const SDXL_PROBE: &str = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight";
const SDXL_PROBE_2: &str = "conditioner.embedders.1.model.token_embedding.weight";
const UNET_PROBE: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// Buffers the LDM trainer (`ldm.models.diffusion.ddpm.LatentDiffusion`) registers for its noise
/// schedule; SD 1.x / 2.x checkpoints carry them. The schedule comes from `scheduler_config.json`.
const LDM_SCHEDULE_BUFFERS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
];

/// The model family a single-file checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// SD 1.x: CLIP ViT-L text encoder under `cond_stage_model.transformer.`.
    Sd1,
    /// SD 2.x (SD-Turbo too): OpenCLIP ViT-H text encoder under `cond_stage_model.model.`.
    Sd2,
    /// SDXL base (SDXL-Turbo too): `conditioner.embedders.0` (CLIP ViT-L) and
    /// `conditioner.embedders.1` (OpenCLIP bigG, with projection).
    Sdxl,
}

impl Architecture {
    /// Reads the architecture off a file's tensor names, `None` when it is none of the three.
    pub fn detect(has: impl Fn(&str) -> bool) -> Option<Self> {
        if !has(UNET_PROBE) {
            return None;
        }
        if has(SDXL_PROBE) && has(SDXL_PROBE_2) {
            Some(Architecture::Sdxl)
        } else if has(SD2_PROBE) {
            Some(Architecture::Sd2)
        } else if has(SD1_PROBE) {
            Some(Architecture::Sd1)
        } else {
            None
        }
    }

    /// A human name: `"SD 1.x"`, `"SD 2.x"`, `"SDXL"`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Sd1 => "SD 1.x",
            Architecture::Sd2 => "SD 2.x",
            Architecture::Sdxl => "SDXL",
        }
    }

    /// Whether the architecture has a second text encoder (SDXL).
    pub fn has_text_encoder_2(self) -> bool {
        self == Architecture::Sdxl
    }

    /// The key prefix of each component in files of this architecture.
    fn prefix(self, component: Component) -> Option<&'static str> {
        Some(match (self, component) {
            (_, Component::Unet) => UNET,
            (_, Component::Vae) => VAE,
            (Architecture::Sd1, Component::TextEncoder) => SD1_TEXT,
            (Architecture::Sd2, Component::TextEncoder) => SD2_TEXT,
            (Architecture::Sdxl, Component::TextEncoder) => SDXL_TEXT,
            (Architecture::Sdxl, Component::TextEncoder2) => SDXL_TEXT_2,
            (_, Component::TextEncoder2) => return None,
        })
    }
}

/// The parts of a pipeline a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `unet/`.
    Unet,
    /// `vae/`.
    Vae,
    /// `text_encoder/`.
    TextEncoder,
    /// `text_encoder_2/` (SDXL).
    TextEncoder2,
}

impl Component {
    const ALL: [Component; 4] = [
        Component::Unet,
        Component::Vae,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    /// The diffusers folder name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// An opened single-file checkpoint: its architecture and, per component, a store with our names.
pub struct SingleFile {
    file: Arc<WeightFile>,
    architecture: Architecture,
    /// File tensors skipped so far (outside every component, and those of the component stores
    /// built), with the reason for each.
    skipped: Mutex<BTreeMap<String, String>>,
}

impl SingleFile {
    /// Opens `path`, detects its [`Architecture`] and checks that every tensor belongs to one of
    /// its components or to the allow-list; an unrecognised file, or tensors of no component, are
    /// errors naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = Arc::new(WeightFile::open(path)?);
        let names: BTreeSet<String> = file.names().into_iter().collect();
        let architecture = Architecture::detect(|n| names.contains(n)).ok_or_else(|| Error::MissingTensor {
            file: path.to_path_buf(),
            name: unrecognised(&names),
        })?;
        let prefixes: Vec<&str> = Component::ALL.iter().filter_map(|&c| architecture.prefix(c)).collect();
        let mut skipped = BTreeMap::new();
        let mut unknown = Vec::new();
        for name in names {
            if prefixes.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            match file_level_allowed(&name) {
                Some(reason) => {
                    skipped.insert(name, reason.to_string());
                }
                None => unknown.push(name),
            }
        }
        if !unknown.is_empty() {
            return Err(Error::UnusedTensors {
                file: path.to_path_buf(),
                names: unknown,
            });
        }
        Ok(SingleFile {
            file,
            architecture,
            skipped: Mutex::new(skipped),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The architecture the keys say.
    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// File tensors skipped on purpose so far, with the reason for each, sorted by name: those
    /// outside every component (from [`SingleFile::open`]) and those the allow-lists of the
    /// component stores built so far name.
    pub fn skipped(&self) -> Vec<(String, String)> {
        let s = self.skipped.lock().expect("skipped lock");
        s.iter().map(|(k, r)| (k.clone(), r.clone())).collect()
    }

    /// The UNet's tensors with diffusers names; the structure (`block_out_channels`,
    /// `layers_per_block`, which blocks have attention) comes from its `config.json`.
    pub fn unet(&self, config_file: &Path) -> Result<TensorStore> {
        let cfg: serde_json::Value = crate::json::read_json(config_file, "config file")?;
        let rules = unet_rules(&UnetShape::from_config(&cfg, config_file)?);
        self.store(Component::Unet, |rest, _| {
            Ok(unet_name(&rules, rest)
                .map(|n| (n, ViewTransform::Identity))
                .into_iter()
                .collect())
        })
    }

    /// The VAE's tensors with diffusers names; its `config.json` gives the number of levels.
    pub fn vae(&self, config_file: &Path) -> Result<TensorStore> {
        let cfg: serde_json::Value = crate::json::read_json(config_file, "config file")?;
        let levels = required_array(&cfg, "block_out_channels", config_file)?.len();
        self.store(Component::Vae, |rest, shape| {
            Ok(vae_name(rest, levels, shape).into_iter().collect())
        })
    }

    /// The (first) text encoder's tensors with transformers names (`text_model.*`); its
    /// `config.json` gives the number of layers and whether it has a projection.
    pub fn text_encoder(&self, config_file: &Path) -> Result<TensorStore> {
        self.text_store(Component::TextEncoder, config_file)
    }

    /// SDXL's second text encoder (OpenCLIP layout in the file), as [`SingleFile::text_encoder`].
    pub fn text_encoder_2(&self, config_file: &Path) -> Result<TensorStore> {
        self.text_store(Component::TextEncoder2, config_file)
    }

    fn text_store(&self, component: Component, config_file: &Path) -> Result<TensorStore> {
        let cfg: serde_json::Value = crate::json::read_json(config_file, "config file")?;
        let layers = cfg
            .get("num_hidden_layers")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::config(config_file, "num_hidden_layers", "missing or not a number"))?
            as usize;
        let projection = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .is_some_and(|a| a == "CLIPTextModelWithProjection");
        let open_clip = matches!(
            (self.architecture, component),
            (Architecture::Sd2, Component::TextEncoder) | (_, Component::TextEncoder2)
        );
        if !open_clip {
            return self.store(component, |rest, _| match rest {
                // transformers 4 saved this non-parameter buffer (`arange(77)`), as every SD 1.x
                // and SDXL checkpoint holds it; the model computes positions itself.
                "text_model.embeddings.position_ids" => Err("position-ids buffer, not a weight"),
                _ => Ok(vec![(rest.to_string(), ViewTransform::Identity)]),
            });
        }
        // SD 2.x conditions on OpenCLIP's penultimate block, so diffusers' text encoder has one
        // block fewer than the file (23 of 24); only that last block may be skipped.
        let blocks = self.open_clip_blocks(component);
        let skip_last = self.architecture == Architecture::Sd2 && blocks == layers + 1;
        let opts = OpenClip {
            layers,
            projection,
            skip_last,
        };
        self.store(component, |rest, shape| open_clip_name(rest, shape, &opts))
    }

    /// The number of `transformer.resblocks.N` in the file under `component`'s prefix.
    fn open_clip_blocks(&self, component: Component) -> usize {
        let prefix = format!(
            "{}transformer.resblocks.",
            self.architecture.prefix(component).unwrap_or_default()
        );
        self.file
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    }

    /// Builds the store of `component`: `map` turns each file tensor (its name past the
    /// component prefix, and its shape) into our names and transforms, an empty list (no view:
    /// the audit will report it) or `Err(reason)` (allow-listed).
    fn store(
        &self,
        component: Component,
        map: impl Fn(&str, &[usize]) -> std::result::Result<Vec<(String, ViewTransform)>, &'static str>,
    ) -> Result<TensorStore> {
        let path = self.path().to_path_buf();
        let prefix = self
            .architecture
            .prefix(component)
            .ok_or_else(|| Error::MissingTensor {
                file: path.clone(),
                name: format!(
                    "{} (an {} checkpoint has no {})",
                    SDXL_TEXT_2,
                    self.architecture.name(),
                    component.name()
                ),
            })?;
        let mut spec = ViewSpec {
            component: format!("{} ({prefix}*)", component.name()),
            ..Default::default()
        };
        for name in self.file.names() {
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            let shape = self.file.shape(&name).expect("name listed by the file");
            match map(rest, &shape) {
                Ok(views) => {
                    for (ours, transform) in views {
                        let view = TensorView {
                            source: name.clone(),
                            transform,
                        };
                        if let Some(other) = spec.views.insert(ours.clone(), view) {
                            return Err(Error::BadSafetensors {
                                file: path,
                                reason: format!("{name} and {} both map to {ours}", other.source),
                            });
                        }
                    }
                }
                Err(reason) => {
                    spec.skipped.insert(name.clone(), reason.to_string());
                }
            }
            spec.scope.insert(name);
        }
        if spec.scope.is_empty() {
            return Err(Error::MissingTensor {
                file: path,
                name: format!("{prefix}* (the file holds no {})", component.name()),
            });
        }
        let mut skipped = self.skipped.lock().expect("skipped lock");
        skipped.extend(spec.skipped.iter().map(|(k, r)| (k.clone(), r.clone())));
        drop(skipped);
        TensorStore::from_views(self.file.clone(), spec)
    }
}

/// Groups `(name, reason)` pairs by reason, one line each: `reason: a, b, ... (N tensors)`.
pub fn summarize_skipped(skipped: &[(String, String)]) -> Vec<String> {
    let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, reason) in skipped {
        by_reason.entry(reason).or_default().push(name);
    }
    by_reason
        .into_iter()
        .map(|(reason, names)| {
            const SHOWN: usize = 3;
            let mut list = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
            if names.len() > SHOWN {
                list.push_str(&format!(", ... ({} tensors)", names.len()));
            }
            format!("{reason}: {list}")
        })
        .collect()
}

/// The allow-list for tensors outside every component, with the reason for each.
fn file_level_allowed(name: &str) -> Option<&'static str> {
    if name.starts_with("model_ema.") {
        // LDM training keeps an EMA copy of the UNet (`model_ema.*`, dots removed from the names)
        // and its bookkeeping (`decay`, `num_updates`); diffusers loads the non-EMA weights unless
        // asked (`extract_ema`), and so do we.
        return Some("EMA weights and bookkeeping; the non-EMA model.diffusion_model.* weights are loaded");
    }
    if LDM_SCHEDULE_BUFFERS.contains(&name) {
        return Some("noise-schedule buffer of the LDM trainer; the schedule comes from scheduler_config.json");
    }
    None
}

fn unrecognised(names: &BTreeSet<String>) -> String {
    let mut tops: Vec<&str> = names.iter().map(|n| n.split('.').next().unwrap_or(n)).collect();
    tops.dedup();
    let found = if tops.is_empty() {
        "none".to_string()
    } else {
        let mut s = tops
            .iter()
            .take(8)
            .map(|t| format!("{t}.*"))
            .collect::<Vec<_>>()
            .join(", ");
        if tops.len() > 8 {
            s.push_str(", ...");
        }
        s
    };
    format!(
        "{UNET_PROBE} with {SD1_PROBE} (SD 1.x), {SD2_PROBE} (SD 2.x) or {SDXL_PROBE} and \
         {SDXL_PROBE_2} (SDXL): not a Stable Diffusion 1.x / 2.x / XL single-file checkpoint in the \
         original (LDM) layout; its tensors are {found}"
    )
}

fn required_array<'a>(cfg: &'a serde_json::Value, key: &str, file: &Path) -> Result<&'a Vec<serde_json::Value>> {
    cfg.get(key).and_then(|v| v.as_array()).ok_or_else(|| {
        Error::config(
            file,
            key,
            "missing or not a list (needed to map a single-file checkpoint)",
        )
    })
}

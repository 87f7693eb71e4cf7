//! Loading a [`StableDiffusionPipeline`] from a diffusers folder or a single-file checkpoint:
//! `model_index.json`, the components' configs (checked to fit together before any weight is
//! read), tokenizers, text encoders, UNet and VAE.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Deserialize;

use super::pipeline::{PipelineKind, StableDiffusionPipeline};
use crate::models::clip::text_model::{is_known_buffer, ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedulers::SchedulerConfig;
use crate::text::ClipTokenizer;
use crate::weights::single_file::{Architecture, SingleFile};
use crate::weights::{LoadOptions, TensorStore, VarBuilder};
use crate::{Error, Result};

/// The parts of `model_index.json` the loader reads.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
    #[serde(flatten)]
    components: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// Whether component `name` is listed with a class (not `[null, null]`).
    fn has(&self, name: &str) -> bool {
        self.components
            .get(name)
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().any(|x| !x.is_null()))
    }

    /// The class of component `name` (`["diffusers", "UNet2DConditionModel"]`), when listed.
    fn class(&self, name: &str) -> Option<&str> {
        self.components.get(name)?.as_array()?.get(1)?.as_str()
    }
}

/// The classes this loader implements, per component of `model_index.json`.
const COMPONENT_CLASSES: [(&str, &[&str]); 5] = [
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("text_encoder", &["CLIPTextModel", "CLIPTextModelWithProjection"]),
    ("text_encoder_2", &["CLIPTextModel", "CLIPTextModelWithProjection"]),
    ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
];

/// Fails when `class` (of component `key` in `file`) is not one this loader implements: a
/// `UNet3DConditionModel` must not load as a 2D UNet.
fn check_class(file: &Path, key: &str, class: Option<&str>) -> Result<()> {
    let Some(class) = class else { return Ok(()) };
    let Some((_, allowed)) = COMPONENT_CLASSES.iter().find(|(k, _)| *k == key) else {
        return Ok(());
    };
    if allowed.contains(&class) {
        Ok(())
    } else {
        Err(Error::config(
            file,
            key,
            format!("class {class:?} is not supported (expected {})", allowed.join(" or ")),
        ))
    }
}

/// Where each component of a pipeline comes from, for [`StableDiffusionPipeline::load`] and
/// [`StableDiffusionPipeline::load_single_file`] (where `root` gives only configs, tokenizers and
/// the scheduler, and `vae` / `unet` replace the checkpoint's).
#[derive(Debug, Clone, Default)]
pub struct PipelineSources {
    /// The pipeline folder (with `model_index.json`).
    pub root: PathBuf,
    /// A replacement `vae/` folder (e.g. an fp16-fixed SDXL VAE).
    pub vae: Option<PathBuf>,
    /// A replacement `unet/` folder (e.g. a fine-tuned UNet).
    pub unet: Option<PathBuf>,
}

/// Loads a CLIP text encoder from a transformers folder; every tensor must be used.
pub fn load_text_encoder(dir: &Path, opts: &LoadOptions) -> Result<ClipTextModel> {
    Ok(load_text_encoder_with_builder(dir, opts)?.0)
}

/// [`load_text_encoder`], also giving the builder the model was made from, which holds the
/// LoRA adapters `opts` attached (for training them).
pub fn load_text_encoder_with_builder(dir: &Path, opts: &LoadOptions) -> Result<(ClipTextModel, VarBuilder)> {
    let store = crate::weights::layout::open_weights(dir, "model", opts.variant.as_deref())?;
    text_encoder_from_store(dir, store, opts)
}

/// Builds a CLIP text encoder with `dir/config.json` from `store`; every tensor must be used.
fn text_encoder_from_store(dir: &Path, store: TensorStore, opts: &LoadOptions) -> Result<(ClipTextModel, VarBuilder)> {
    let cfg = ClipTextConfig::from_file(dir.join("config.json"))?;
    let vb = opts.var_builder(store);
    let model = ClipTextModel::load(&cfg, vb.clone())?;
    crate::weights::check_all_used(&vb, is_known_buffer)?;
    Ok((model, vb))
}

/// Builds a model with `build(dir/config.json, weights)` from `store`; every tensor must be used.
fn model_from_store<M>(
    dir: &Path,
    store: TensorStore,
    opts: &LoadOptions,
    build: impl FnOnce(&Path, VarBuilder) -> Result<M>,
) -> Result<M> {
    let vb = opts.var_builder(store);
    let model = build(&dir.join("config.json"), vb.clone())?;
    crate::weights::check_all_used(&vb, |_| false)?;
    Ok(model)
}

/// Builds a UNet with `dir/config.json` from `store`; every tensor must be used.
fn unet_from_store(dir: &Path, store: TensorStore, opts: &LoadOptions) -> Result<UNet2DConditionModel> {
    model_from_store(dir, store, opts, |file, vb| {
        UNet2DConditionModel::new(&UNet2DConditionConfig::from_file(file)?, file, vb)
    })
}

/// Builds a VAE with `dir/config.json` from `store`; every tensor must be used.
fn vae_from_store(dir: &Path, store: TensorStore, opts: &LoadOptions) -> Result<AutoencoderKL> {
    model_from_store(dir, store, opts, |file, vb| {
        AutoencoderKL::new(&AutoencoderKLConfig::from_file(file)?, file, vb)
    })
}

/// Checks, before any weight is read, that the components fit together: the UNet's
/// `in_channels` and the VAE's `latent_channels`, the UNet's `cross_attention_dim` and the text
/// encoders' `hidden_size` (summed for SDXL's two), the UNet's and VAE's `_class_name`, and a
/// usable `scaling_factor`. A replacement `--unet` of another architecture fails here, naming
/// both files and keys, instead of in a matrix product.
fn check_fit(
    (unet_file, unet): (&Path, &UNet2DConditionConfig),
    (vae_file, vae): (&Path, &AutoencoderKLConfig),
    text_encoder_dirs: &[&PathBuf],
) -> Result<()> {
    for (file, extra, expected) in [
        (unet_file, &unet.extra, "UNet2DConditionModel"),
        (vae_file, &vae.extra, "AutoencoderKL"),
    ] {
        match extra.get("_class_name").and_then(|v| v.as_str()) {
            Some(class) if class != expected => {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("{class:?} is not supported here (expected {expected})"),
                ))
            }
            _ => {}
        }
    }
    let sf = vae.scaling_factor;
    if !(sf.is_finite() && sf > 0.0) {
        return Err(Error::config(
            vae_file,
            "scaling_factor",
            format!("must be a positive number (latents are divided by it before decoding), got {sf}"),
        ));
    }
    if unet.in_channels != vae.latent_channels {
        return Err(Error::config(
            unet_file,
            "in_channels",
            format!(
                "{} does not fit the VAE's latent_channels {} ({}): the UNet is of another architecture",
                unet.in_channels,
                vae.latent_channels,
                vae_file.display()
            ),
        ));
    }
    let mut hidden = Vec::with_capacity(text_encoder_dirs.len());
    for dir in text_encoder_dirs {
        let file = dir.join("config.json");
        hidden.push((file.clone(), ClipTextConfig::from_file(&file)?.hidden_size));
    }
    let width: usize = hidden.iter().map(|(_, h)| h).sum();
    let cross = unet
        .cross_attention_dim
        .expand(unet.down_block_types.len(), unet_file, "cross_attention_dim")?;
    if let Some(&c) = cross.iter().find(|&&c| c != width) {
        let encoders: Vec<String> = hidden
            .iter()
            .map(|(f, h)| format!("hidden_size {h} in {}", f.display()))
            .collect();
        return Err(Error::config(
            unet_file,
            "cross_attention_dim",
            format!(
                "{c} does not fit the text states of width {width} ({}): the UNet is of another architecture",
                encoders.join(" plus ")
            ),
        ));
    }
    Ok(())
}

/// Fails with [`Error::MissingFile`] when the component folder `dir` is absent.
fn require_dir(dir: &Path, what: &str) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: format!("{what} folder"),
        })
    }
}
impl StableDiffusionPipeline {
    /// Loads every component of a diffusers pipeline folder.
    pub fn load(sources: &PipelineSources, opts: &LoadOptions) -> Result<Self> {
        Self::load_from(sources, None, opts, None)
    }

    /// Loads every component but the UNet, and takes `unet`, built from `sources.unet` (or
    /// `root/unet`), in its place: the UNet of a LoRA run, whose base weights then serve both
    /// as the policy (adapters on) and the reference (adapters off) without a second copy.
    pub fn load_with_unet(sources: &PipelineSources, opts: &LoadOptions, unet: UNet2DConditionModel) -> Result<Self> {
        Self::load_from(sources, None, opts, Some(unet))
    }

    /// Loads the weights of a single-file checkpoint (see [`SingleFile`]): UNet, VAE and text
    /// encoders, except those `sources.unet` / `sources.vae` replace. `sources.root` is a diffusers
    /// pipeline folder of the same architecture that gives the components' `config.json`, the
    /// tokenizers and the scheduler (its weight files are not read). A folder of another family
    /// (an SDXL file with an SD 1.x folder, or the reverse) is an error naming both.
    pub fn load_single_file(checkpoint: &SingleFile, sources: &PipelineSources, opts: &LoadOptions) -> Result<Self> {
        Self::load_from(sources, Some(checkpoint), opts, None)
    }

    fn load_from(
        sources: &PipelineSources,
        single: Option<&SingleFile>,
        opts: &LoadOptions,
        unet: Option<UNet2DConditionModel>,
    ) -> Result<Self> {
        let root = &sources.root;
        let index_path = root.join("model_index.json");
        let index: ModelIndex = crate::models::config::read_config(&index_path)?;
        let kind = match index.class_name.as_deref() {
            Some(c) if c.starts_with("StableDiffusionXL") => PipelineKind::StableDiffusionXl,
            Some(c) if c.starts_with("StableDiffusion") => PipelineKind::StableDiffusion,
            _ if index.has("text_encoder_2") => PipelineKind::StableDiffusionXl,
            _ if index.has("text_encoder") => PipelineKind::StableDiffusion,
            other => {
                return Err(Error::config(
                    &index_path,
                    "_class_name",
                    format!("{other:?} is not a Stable Diffusion text-to-image pipeline"),
                ))
            }
        };
        if let Some(sf) = single {
            let file_kind = match sf.architecture() {
                Architecture::Sdxl => PipelineKind::StableDiffusionXl,
                Architecture::Sd1 | Architecture::Sd2 => PipelineKind::StableDiffusion,
            };
            if file_kind != kind {
                let class = |k: PipelineKind| match k {
                    PipelineKind::StableDiffusion => "StableDiffusionPipeline",
                    PipelineKind::StableDiffusionXl => "StableDiffusionXLPipeline",
                };
                return Err(Error::config(
                    &index_path,
                    "_class_name",
                    format!(
                        "a {} folder does not fit {}, an {} checkpoint: its configs, tokenizers and \
                         scheduler must come from a {} folder of the same architecture",
                        class(kind),
                        sf.path().display(),
                        sf.architecture().name(),
                        class(file_kind)
                    ),
                ));
            }
        }
        for comp in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !index.has(comp) {
                return Err(Error::config(&index_path, comp, "component missing (null or absent)"));
            }
        }
        for (comp, _) in COMPONENT_CLASSES {
            check_class(&index_path, comp, index.class(comp))?;
        }
        let unet_dir = sources.unet.clone().unwrap_or_else(|| root.join("unet"));
        let vae_dir = sources.vae.clone().unwrap_or_else(|| root.join("vae"));
        for (dir, what) in [
            (&unet_dir, "unet"),
            (&vae_dir, "vae"),
            (&root.join("text_encoder"), "text_encoder"),
            (&root.join("tokenizer"), "tokenizer"),
            (&root.join("scheduler"), "scheduler"),
        ] {
            require_dir(dir, what)?;
        }
        let te_dir = root.join("text_encoder");
        let te2_dir = (kind == PipelineKind::StableDiffusionXl).then(|| root.join("text_encoder_2"));
        let unet_config_file = unet_dir.join("config.json");
        let unet_config = UNet2DConditionConfig::from_file(&unet_config_file)?;
        let vae_cfg = AutoencoderKLConfig::from_file(&vae_dir.join("config.json"))?;
        check_fit(
            (&unet_config_file, &unet_config),
            (&vae_dir.join("config.json"), &vae_cfg),
            &[Some(&te_dir), te2_dir.as_ref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
        )?;
        let scheduler_config = SchedulerConfig::from_file(root.join("scheduler").join("scheduler_config.json"))?;
        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let text_encoder = match single {
            Some(sf) => text_encoder_from_store(&te_dir, sf.text_encoder(&te_dir.join("config.json"))?, opts)?.0,
            None => load_text_encoder(&te_dir, opts)?,
        };
        let (tokenizer_2, text_encoder_2) = if let Some(te2_dir) = &te2_dir {
            require_dir(te2_dir, "text_encoder_2")?;
            require_dir(&root.join("tokenizer_2"), "tokenizer_2")?;
            let te2 = match single {
                Some(sf) => text_encoder_from_store(te2_dir, sf.text_encoder_2(&te2_dir.join("config.json"))?, opts)?.0,
                None => load_text_encoder(te2_dir, opts)?,
            };
            if !te2.config().architecture.has_projection() {
                return Err(Error::config(
                    root.join("text_encoder_2/config.json"),
                    "architectures",
                    "SDXL's second text encoder must be CLIPTextModelWithProjection",
                ));
            }
            (Some(ClipTokenizer::from_dir(&root.join("tokenizer_2"))?), Some(te2))
        } else {
            (None, None)
        };
        // The checkpoint's UNet and VAE, unless a replacement folder is given.
        let single_unet = single.filter(|_| sources.unet.is_none());
        let single_vae = single.filter(|_| sources.vae.is_none());
        let unet = match (unet, single_unet) {
            (Some(unet), _) => unet,
            (None, Some(sf)) => unet_from_store(&unet_dir, sf.unet(&unet_dir.join("config.json"))?, opts)?,
            (None, None) => UNet2DConditionModel::from_pretrained(&unet_dir, opts)?.0,
        };
        // diffusers runs `force_upcast` VAEs in f32 whatever the pipeline dtype (fp16 SD VAEs overflow).
        let vae_opts = if vae_cfg.force_upcast {
            LoadOptions {
                dtype: DType::F32,
                ..opts.clone()
            }
        } else {
            opts.clone()
        };
        let vae = match single_vae {
            Some(sf) => vae_from_store(&vae_dir, sf.vae(&vae_dir.join("config.json"))?, &vae_opts)?,
            None => AutoencoderKL::from_pretrained(&vae_dir, &vae_opts)?.0,
        };
        if unet.needs_added_cond() != (kind == PipelineKind::StableDiffusionXl) {
            return Err(Error::config(
                unet_dir.join("config.json"),
                "addition_embed_type",
                format!("does not fit a {kind:?} pipeline"),
            ));
        }
        let force_zeros_for_empty_prompt = index
            .force_zeros_for_empty_prompt
            .unwrap_or(kind == PipelineKind::StableDiffusionXl);
        let mut unknown = vec![
            (
                root.join("scheduler/scheduler_config.json"),
                scheduler_config.unknown_keys(),
            ),
            (unet_config_file.clone(), unet_config.unknown_keys()),
            (vae_dir.join("config.json"), vae_cfg.unknown_keys()),
            (te_dir.join("config.json"), text_encoder.config().unknown_keys()),
        ];
        if let Some(te2) = &text_encoder_2 {
            unknown.push((root.join("text_encoder_2/config.json"), te2.config().unknown_keys()));
        }
        let warnings = unknown
            .into_iter()
            .filter(|(_, keys)| !keys.is_empty())
            .map(|(file, keys)| {
                format!(
                    "{}: ignoring keys this version does not read: {}",
                    file.display(),
                    keys.join(", ")
                )
            })
            .collect();
        Ok(StableDiffusionPipeline {
            kind,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            unet,
            unet_config,
            unet_config_file,
            vae,
            scheduler_config,
            force_zeros_for_empty_prompt,
            warnings,
            dtype: opts.dtype,
            device: opts.device.clone(),
        })
    }

    /// Fails, naming `config_file` and its key, when `unet` (a tuned or policy UNet loaded beside
    /// this pipeline) does not take this pipeline's latents and text states, instead of failing
    /// later in a matrix product.
    pub fn check_unet_fits(&self, unet: &UNet2DConditionModel, config_file: &Path) -> Result<()> {
        for (key, got, want) in [
            ("in_channels", unet.in_channels(), self.unet.in_channels()),
            (
                "cross_attention_dim",
                unet.cross_attention_dim(),
                self.unet.cross_attention_dim(),
            ),
        ] {
            if got != want {
                return Err(Error::config(
                    config_file,
                    key,
                    format!(
                        "{got} does not fit the pipeline's {want} ({}): the UNet is of another architecture",
                        self.unet_config_file.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

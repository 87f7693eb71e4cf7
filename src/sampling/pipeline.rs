//! A whole Stable Diffusion pipeline (SD 1.x / 2.x and XL, Turbo included) loaded from a
//! diffusers folder or from a single-file (LDM-layout) checkpoint with a diffusers folder for its
//! configs, and text-to-image generation with diffusers' semantics.
//! Counterparts: `diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py` and
//! `stable_diffusion_xl/pipeline_stable_diffusion_xl.py`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::models::clip::text_model::{is_known_buffer, ClipTextConfig, ClipTextModel};
use crate::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::rng::Rng;
use crate::sampling::budget::{self, Job, MemoryEstimate};
use crate::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::text::ClipTokenizer;
use crate::weights::single_file::{Architecture, SingleFile};
use crate::weights::store::check_finite;
use crate::weights::{LoadOptions, TensorStore};
use crate::{Error, Result};

/// Which pipeline family a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// `StableDiffusionPipeline`: SD 1.x, 2.x, SD-Turbo. One text encoder, last hidden state.
    StableDiffusion,
    /// `StableDiffusionXLPipeline`: SDXL, SDXL-Turbo. Two text encoders, penultimate hidden
    /// states, pooled projection and time ids.
    StableDiffusionXl,
}

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

/// Encoded prompts: the UNet's text states and, for SDXL, the pooled projection.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, 77, cross_attention_dim]`.
    pub context: Tensor,
    /// SDXL's pooled, projected embedding of the second encoder, `[B, P]`.
    pub pooled: Option<Tensor>,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// One prompt per image.
    pub prompts: Vec<String>,
    /// One negative prompt per image; `None` means "not given" (SDXL with
    /// `force_zeros_for_empty_prompt` then uses zero negative embeddings).
    pub negative_prompts: Option<Vec<String>>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; guidance runs only when > 1.
    pub guidance: f64,
    /// Image height in pixels (divisible by the VAE factor).
    pub height: usize,
    /// Image width in pixels (divisible by the VAE factor).
    pub width: usize,
    /// Unscaled initial latent noise `[B, C, h, w]` (diffusers' `latents=`).
    pub init_noise: Tensor,
    /// Sampler override; `None` uses the checkpoint's scheduler class.
    pub scheduler: Option<SchedulerKind>,
    /// Seed of the noise that stochastic samplers add during the loop.
    pub seed: u64,
    /// SDXL micro-conditioning `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`;
    /// `None` gives `(height, width, 0, 0, height, width)`.
    pub time_ids: Option<[f64; 6]>,
}

/// What the denoiser is conditioned on, from [`StableDiffusionPipeline::conditioning`].
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Text states, `[B or 2B, 77, D]` in the pipeline's dtype (negatives first under guidance).
    pub context: Tensor,
    /// SDXL's pooled embedding and time ids.
    pub added: Option<AddedCond>,
    /// Classifier-free guidance scale; guidance runs only when > 1.
    pub guidance: f64,
    /// Images per call.
    pub batch: usize,
    /// Latent `(h, w)`.
    pub latent_size: (usize, usize),
}

/// Generated images.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `[B, H, W, 3]` f32 in [0, 1].
    pub images: Tensor,
    /// The final latents `[B, C, h, w]` (scaled, before decoding).
    pub latents: Tensor,
}

/// A loaded pipeline.
pub struct StableDiffusionPipeline {
    /// The pipeline family.
    pub kind: PipelineKind,
    /// Tokenizer of the (first) text encoder.
    pub tokenizer: ClipTokenizer,
    /// The (first) text encoder.
    pub text_encoder: ClipTextModel,
    /// SDXL's second tokenizer.
    pub tokenizer_2: Option<ClipTokenizer>,
    /// SDXL's second text encoder (with projection).
    pub text_encoder_2: Option<ClipTextModel>,
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// The denoiser's config (for the memory estimate of a job).
    pub unet_config: UNet2DConditionConfig,
    /// Where the denoiser's config was read (for messages about its keys).
    pub unet_config_file: PathBuf,
    /// The autoencoder.
    pub vae: AutoencoderKL,
    /// The scheduler config (beta schedule, prediction type, default sampler).
    pub scheduler_config: SchedulerConfig,
    /// SDXL: zero negative embeddings when no negative prompt is given.
    pub force_zeros_for_empty_prompt: bool,
    /// Config keys this implementation does not read, one line per file, for the caller to show.
    pub warnings: Vec<String>,
    dtype: DType,
    device: Device,
}

/// Loads a CLIP text encoder from a transformers folder; every tensor must be used.
pub fn load_text_encoder(dir: &Path, opts: &LoadOptions) -> Result<ClipTextModel> {
    let store = crate::weights::layout::open_weights(dir, "model", opts.variant.as_deref())?;
    text_encoder_from_store(dir, store, opts)
}

/// Builds a CLIP text encoder with `dir/config.json` from `store`; every tensor must be used.
fn text_encoder_from_store(dir: &Path, store: TensorStore, opts: &LoadOptions) -> Result<ClipTextModel> {
    let cfg = ClipTextConfig::from_file(dir.join("config.json"))?;
    let vb = opts.var_builder(store);
    let model = ClipTextModel::load(&cfg, vb.clone())?;
    crate::weights::check_all_used(&vb, is_known_buffer)?;
    Ok(model)
}

/// Builds a UNet with `dir/config.json` from `store`; every tensor must be used.
fn unet_from_store(dir: &Path, store: TensorStore, opts: &LoadOptions) -> Result<UNet2DConditionModel> {
    let config_file = dir.join("config.json");
    let cfg = UNet2DConditionConfig::from_file(&config_file)?;
    let vb = opts.var_builder(store);
    let model = UNet2DConditionModel::new(&cfg, &config_file, vb.clone())?;
    crate::weights::check_all_used(&vb, |_| false)?;
    Ok(model)
}

/// Builds a VAE with `dir/config.json` from `store`; every tensor must be used.
fn vae_from_store(dir: &Path, store: TensorStore, opts: &LoadOptions) -> Result<AutoencoderKL> {
    let config_file = dir.join("config.json");
    let cfg = AutoencoderKLConfig::from_file(&config_file)?;
    let vb = opts.var_builder(store);
    let model = AutoencoderKL::new(&cfg, &config_file, vb.clone())?;
    crate::weights::check_all_used(&vb, |_| false)?;
    Ok(model)
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
        Self::load_from(sources, None, opts)
    }

    /// Loads the weights of a single-file checkpoint (see [`SingleFile`]): UNet, VAE and text
    /// encoders, except those `sources.unet` / `sources.vae` replace. `sources.root` is a diffusers
    /// pipeline folder of the same architecture that gives the components' `config.json`, the
    /// tokenizers and the scheduler (its weight files are not read). A folder of another family
    /// (an SDXL file with an SD 1.x folder, or the reverse) is an error naming both.
    pub fn load_single_file(checkpoint: &SingleFile, sources: &PipelineSources, opts: &LoadOptions) -> Result<Self> {
        Self::load_from(sources, Some(checkpoint), opts)
    }

    fn load_from(sources: &PipelineSources, single: Option<&SingleFile>, opts: &LoadOptions) -> Result<Self> {
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
            Some(sf) => text_encoder_from_store(&te_dir, sf.text_encoder(&te_dir.join("config.json"))?, opts)?,
            None => load_text_encoder(&te_dir, opts)?,
        };
        let (tokenizer_2, text_encoder_2) = if let Some(te2_dir) = &te2_dir {
            require_dir(te2_dir, "text_encoder_2")?;
            require_dir(&root.join("tokenizer_2"), "tokenizer_2")?;
            let te2 = match single {
                Some(sf) => text_encoder_from_store(te2_dir, sf.text_encoder_2(&te2_dir.join("config.json"))?, opts)?,
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
        let unet = match single_unet {
            Some(sf) => unet_from_store(&unet_dir, sf.unet(&unet_dir.join("config.json"))?, opts)?,
            None => UNet2DConditionModel::from_pretrained(&unet_dir, opts)?.0,
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

    /// Whether the checkpoint is a few-step (Turbo-style) model: its scheduler spaces timesteps
    /// `trailing`, so that one step starts at the last training timestep, as SD-Turbo's and
    /// SDXL-Turbo's do (multi-step checkpoints use `leading` or `linspace`).
    pub fn is_few_step(&self) -> bool {
        self.scheduler_config.timestep_spacing == Some(crate::schedulers::TimestepSpacing::Trailing)
    }

    /// The spatial factor between images and latents.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }

    /// The device the pipeline runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encodes `texts` as diffusers does without guidance: SD takes the last hidden state; SDXL
    /// concatenates both encoders' penultimate states and adds the second's pooled projection.
    pub fn encode_text<S: AsRef<str>>(&self, texts: &[S]) -> Result<PromptEmbeds> {
        let ids = self.tokenizer.encode_batch_tensor(texts, &self.device)?;
        let out = self.text_encoder.forward(&ids)?;
        match (&self.tokenizer_2, &self.text_encoder_2) {
            (Some(tok2), Some(te2)) => {
                let ids2 = tok2.encode_batch_tensor(texts, &self.device)?;
                let out2 = te2.forward(&ids2)?;
                let context = Tensor::cat(&[&out.penultimate_hidden_state, &out2.penultimate_hidden_state], 2)?;
                let pooled = out2.text_embeds.expect("checked at load: encoder 2 has a projection");
                Ok(PromptEmbeds {
                    context,
                    pooled: Some(pooled),
                })
            }
            _ => Ok(PromptEmbeds {
                context: out.last_hidden_state,
                pooled: None,
            }),
        }
    }

    /// Conditioning for a batch with optional classifier-free guidance: with guidance the batch
    /// is `[negative; positive]`, as diffusers orders it.
    pub fn encode_prompts(
        &self,
        prompts: &[String],
        negative_prompts: Option<&[String]>,
        guidance: bool,
    ) -> Result<PromptEmbeds> {
        let pos = self.encode_text(prompts)?;
        if !guidance {
            return Ok(pos);
        }
        let neg = match negative_prompts {
            None if self.kind == PipelineKind::StableDiffusionXl && self.force_zeros_for_empty_prompt => PromptEmbeds {
                context: pos.context.zeros_like()?,
                pooled: pos.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
            },
            None => self.encode_text(&vec![String::new(); prompts.len()])?,
            Some(n) => self.encode_text(n)?,
        };
        let context = Tensor::cat(&[&neg.context, &pos.context], 0)?;
        let pooled = match (neg.pooled, pos.pooled) {
            (Some(n), Some(p)) => Some(Tensor::cat(&[&n, &p], 0)?),
            _ => None,
        };
        Ok(PromptEmbeds { context, pooled })
    }

    /// Checks a requested size against the VAE factor; names the offending argument.
    pub fn check_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        for (what, v) in [("height", height), ("width", width)] {
            if v == 0 || v % f != 0 {
                return Err(Error::input(
                    what,
                    format!("must be a positive multiple of {f} (the VAE factor), got {v}"),
                ));
            }
        }
        Ok((height / f, width / f))
    }

    /// The estimated peak memory of a job of `batch` images at `latent` size (see
    /// [`super::budget`]), with guidance when `guided`; `retained_calls` counts the UNet calls
    /// whose activations are kept at once (1 for sampling, more when differentiating through
    /// the loop).
    pub fn memory_estimate(
        &self,
        batch: usize,
        guided: bool,
        latent: (usize, usize),
        retained_calls: usize,
    ) -> MemoryEstimate {
        let job = Job {
            batch,
            guided,
            latent,
            dtype: self.dtype,
            device: &self.device,
            retained_calls,
        };
        budget::estimate(&job, &self.unet_config, self.vae.config())
    }

    /// Generates images; `progress` is called after each denoising step with `(done, total)`.
    pub fn generate(&self, req: &GenerateRequest, progress: &mut dyn FnMut(usize, usize)) -> Result<Generated> {
        self.generate_with(&self.unet, req, progress)
    }

    /// [`Self::generate`] with another UNet of the same architecture (e.g. a policy in training).
    pub fn generate_with(
        &self,
        unet: &UNet2DConditionModel,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        let cond = self.conditioning(
            &req.prompts,
            req.negative_prompts.as_deref(),
            req.guidance,
            (req.height, req.width),
            req.time_ids,
        )?;
        let mut scheduler = self.scheduler_config.build(req.scheduler, req.steps)?;
        let mut rng = Rng::new(req.seed);
        let latents = self.denoise(unet, &cond, scheduler.as_mut(), &req.init_noise, &mut rng, progress)?;
        let images = self.decode_latents(&latents)?;
        Ok(Generated { images, latents })
    }

    /// Everything the denoiser is conditioned on for `prompts` at `(height, width)` pixels: the
    /// text states (with the negatives first when `guidance > 1`) and SDXL's added conditions
    /// (`time_ids` `None` gives `(H, W, 0, 0, H, W)`).
    pub fn conditioning(
        &self,
        prompts: &[String],
        negative_prompts: Option<&[String]>,
        guidance: f64,
        (height, width): (usize, usize),
        time_ids: Option<[f64; 6]>,
    ) -> Result<Conditioning> {
        let b = prompts.len();
        if b == 0 {
            return Err(Error::input("prompt", "no prompt given"));
        }
        if let Some(n) = negative_prompts {
            if n.len() != b {
                return Err(Error::input(
                    "negative prompt",
                    format!("expected {b} (one per prompt), got {}", n.len()),
                ));
            }
        }
        let latent_size = self.check_size(height, width)?;
        let guided = guidance > 1.0;
        let embeds = self.encode_prompts(prompts, negative_prompts, guided)?;
        let context = embeds.context.to_dtype(self.dtype)?;
        let rows = if guided { 2 * b } else { b };
        let added = match &embeds.pooled {
            Some(pooled) => {
                let ids = time_ids.unwrap_or([height as f64, width as f64, 0.0, 0.0, height as f64, width as f64]);
                let ids: Vec<f32> = (0..rows).flat_map(|_| ids.iter().map(|&v| v as f32)).collect();
                Some(AddedCond {
                    text_embeds: pooled.to_dtype(self.dtype)?,
                    time_ids: Tensor::from_vec(ids, (rows, 6), &self.device)?,
                })
            }
            None => None,
        };
        Ok(Conditioning {
            context,
            added,
            guidance,
            batch: b,
            latent_size,
        })
    }

    /// Runs `scheduler`'s sampling loop from the unscaled noise `init_noise` `[B, C, h, w]` and
    /// returns the final (scaled) latents in f32. Every op is differentiable, so a gradient
    /// reaches `init_noise` when it is a variable (ReNO). `progress` gets `(done, total)`.
    pub fn denoise(
        &self,
        unet: &UNet2DConditionModel,
        cond: &Conditioning,
        scheduler: &mut dyn Scheduler,
        init_noise: &Tensor,
        rng: &mut Rng,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = cond.batch;
        let want = [b, unet.in_channels(), cond.latent_size.0, cond.latent_size.1];
        if init_noise.dims() != want {
            return Err(Error::input(
                "init noise",
                format!("expected shape {want:?}, got {:?}", init_noise.dims()),
            ));
        }
        let guided = cond.guidance > 1.0;
        let rows = if guided { 2 * b } else { b };
        let mut latents = (init_noise.to_device(&self.device)?.to_dtype(DType::F32)? * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let ts = Tensor::from_vec(vec![t as f32; rows], rows, &self.device)?;
            let pred = unet.forward(&input.to_dtype(self.dtype)?, &ts, &cond.context, cond.added.as_ref())?;
            let pred = pred.to_dtype(DType::F32)?;
            let pred = if guided {
                let (uncond, text) = (pred.narrow(0, 0, b)?, pred.narrow(0, b, b)?);
                (&uncond + ((text - &uncond)? * cond.guidance)?)?
            } else {
                pred
            };
            check_finite(&pred, || {
                format!(
                    "sampling step {} of {} (timestep {t}): the unet output",
                    i + 1,
                    timesteps.len()
                )
            })?;
            latents = scheduler.step(&pred, i, &latents, rng)?;
            progress(i + 1, timesteps.len());
        }
        Ok(latents)
    }

    /// Decodes scaled latents to `[B, 3, H, W]` f32 images in [0, 1] (differentiable; the clamp
    /// passes no gradient where it clips, as in diffusers).
    pub fn decode_images(&self, latents: &Tensor) -> Result<Tensor> {
        let vae_dtype = self.vae_dtype();
        let z = (latents.to_dtype(vae_dtype)? / self.vae.config().scaling_factor)?;
        let decoded = self.vae.decode(&z)?.to_dtype(DType::F32)?;
        check_finite(&decoded, || "decoding the final latents: the vae output".into())?;
        Ok(((decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Decodes scaled latents to `[B, H, W, 3]` images in [0, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decode_images(latents)?.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// The dtype the VAE runs in (f32 for `force_upcast` VAEs).
    fn vae_dtype(&self) -> DType {
        if self.vae.config().force_upcast {
            DType::F32
        } else {
            self.dtype
        }
    }
}

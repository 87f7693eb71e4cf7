//! A whole Stable Diffusion pipeline (SD 1.x / 2.x and XL, Turbo included) and text-to-image
//! generation with diffusers' semantics; loading (from a diffusers folder or a single-file
//! checkpoint) is in [`super::load`].
//! Counterparts: `diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py` and
//! `stable_diffusion_xl/pipeline_stable_diffusion_xl.py`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub use super::load::{load_text_encoder, PipelineSources};
use crate::models::clip::text_model::ClipTextModel;
use crate::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::AutoencoderKL;
use crate::rng::Rng;
use crate::sampling::budget::{self, Job, MemoryEstimate};
use crate::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::text::ClipTokenizer;
use crate::weights::store::check_finite;
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

impl PipelineKind {
    /// diffusers' default classifier-free guidance scale of the family: 7.5, or 5.0 for SDXL.
    pub fn default_guidance(self) -> f64 {
        match self {
            PipelineKind::StableDiffusion => 7.5,
            PipelineKind::StableDiffusionXl => 5.0,
        }
    }
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

impl GenerateRequest {
    /// One image of `prompt` from `init_noise`, at `size` (height, width) pixels, with no
    /// negative prompt, the checkpoint's sampler and default SDXL time ids.
    pub fn new(
        prompt: String,
        init_noise: Tensor,
        seed: u64,
        steps: usize,
        guidance: f64,
        size: (usize, usize),
    ) -> Self {
        GenerateRequest {
            prompts: vec![prompt],
            negative_prompts: None,
            steps,
            guidance,
            height: size.0,
            width: size.1,
            init_noise,
            scheduler: None,
            seed,
            time_ids: None,
        }
    }
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
    /// Diffusion-NPO (Wang et al., ICLR 2025, `G-U-N/Diffusion-NPO`): the model that predicts
    /// the negative (unconditional or negative-prompt) branch of guidance, the base with the
    /// negative-preference adapter at weight `w`. Guidance then reads
    /// `eps = eps_npo(x_t, c_neg) + s * (eps(x_t, c) - eps_npo(x_t, c_neg))`, the paper's
    /// `s * eps(x_t, c) + (1 - s) * eps_npo(x_t, c_neg)`; `None` is plain guidance.
    pub negative_unet: Option<UNet2DConditionModel>,
}

impl Conditioning {
    /// The denoiser's guided output for the scaled model input `input` `[B, C, h, w]` at
    /// timestep `t`: `uncond + guidance·(text − uncond)` under guidance (the unconditional
    /// branch from the NPO model when there is one), in f32 (one step of
    /// [`StableDiffusionPipeline::denoise`], differentiable in `input` and the UNet's parameters).
    pub fn guided_prediction(&self, unet: &UNet2DConditionModel, input: &Tensor, t: f64) -> Result<Tensor> {
        let b = self.batch;
        let guided = self.guidance > 1.0;
        let rows = if guided { 2 * b } else { b };
        let input = if guided {
            Tensor::cat(&[input, input], 0)?
        } else {
            input.clone()
        };
        let ts = Tensor::from_vec(vec![t as f32; rows], rows, self.context.device())?;
        let input = input.to_dtype(self.context.dtype())?;
        let pred = match (&self.negative_unet, guided) {
            (Some(negative), true) => npo_predictions(unet, negative, &input, &ts, self)?,
            _ => unet.forward(&input, &ts, &self.context, self.added.as_ref())?,
        };
        let pred = pred.to_dtype(DType::F32)?;
        Ok(if guided {
            let (uncond, text) = (pred.narrow(0, 0, b)?, pred.narrow(0, b, b)?);
            (&uncond + ((text - &uncond)? * self.guidance)?)?
        } else {
            pred
        })
    }
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
    pub(super) dtype: DType,
    pub(super) device: Device,
}

impl StableDiffusionPipeline {
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
        self.generate_npo(unet, None, req, progress)
    }

    /// [`Self::generate_with`] with Diffusion-NPO's `negative` UNet predicting guidance's
    /// negative branch ([`Conditioning::negative_unet`]); `None` is plain guidance.
    pub fn generate_npo(
        &self,
        unet: &UNet2DConditionModel,
        negative: Option<&UNet2DConditionModel>,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        let cond = Conditioning {
            negative_unet: negative.cloned(),
            ..self.conditioning(
                &req.prompts,
                req.negative_prompts.as_deref(),
                req.guidance,
                (req.height, req.width),
                req.time_ids,
            )?
        };
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
            negative_unet: None,
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
        let mut latents = (init_noise.to_device(&self.device)?.to_dtype(DType::F32)? * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(&latents, i)?;
            let pred = cond.guided_prediction(unet, &input, t)?;
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

/// The guided batch's predictions `[2B, ...]` with the negative half (rows `0..B`) from
/// `negative` and the conditional half from `unet` (Diffusion-NPO).
fn npo_predictions(
    unet: &UNet2DConditionModel,
    negative: &UNet2DConditionModel,
    input: &Tensor,
    ts: &Tensor,
    cond: &Conditioning,
) -> Result<Tensor> {
    let b = cond.batch;
    let half = |t: &Tensor, i: usize| t.narrow(0, i * b, b);
    let added = |i: usize| -> Result<Option<AddedCond>> {
        cond.added
            .as_ref()
            .map(|a| {
                Ok(AddedCond {
                    text_embeds: half(&a.text_embeds, i)?,
                    time_ids: half(&a.time_ids, i)?,
                })
            })
            .transpose()
    };
    let run = |model: &UNet2DConditionModel, i: usize| -> Result<Tensor> {
        model.forward(
            &half(input, i)?,
            &half(ts, i)?,
            &half(&cond.context, i)?,
            added(i)?.as_ref(),
        )
    };
    Ok(Tensor::cat(&[run(negative, 0)?, run(unet, 1)?], 0)?)
}

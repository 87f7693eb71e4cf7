//! Inputs several commands share: prompts, initial noise and reward models.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use diffalign::reward::{load_reward, ImageReward, RewardSpec};
use diffalign::sampling::budget;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::weights::{LoadOptions, TensorStore};

/// `--prompt` / `--prompts` of the commands that generate from one prompt or a file of them.
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// The prompt.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A file with one prompt per line (blank lines skipped).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

impl PromptArgs {
    /// The prompts the flags give (see [`read_prompts`]).
    pub fn read(&self) -> anyhow::Result<Vec<String>> {
        read_prompts(self.prompt.as_deref(), self.prompts.as_deref())
    }
}

/// `--height` / `--width` of the commands that generate images.
#[derive(Debug, Args)]
pub struct SizeArgs {
    /// Image height in pixels (default: the --init-noise's where given, else the UNet's sample
    /// size times the VAE factor).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: the --init-noise's where given, else the UNet's sample
    /// size times the VAE factor).
    #[arg(long)]
    pub width: Option<usize>,
}

/// The prompts of `--prompt TEXT` or `--prompts FILE` (one per line, blank lines skipped).
pub fn read_prompts(prompt: Option<&str>, file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    match (prompt, file) {
        (Some(p), None) => Ok(vec![p.to_string()]),
        (None, Some(file)) => Ok(diffalign::train::reward_ft::prompts::read_prompt_file(file)?),
        _ => bail!("give --prompt TEXT or --prompts FILE"),
    }
}

/// The tensor `init_noise` `[1, C, h, w]` of a safetensors file, in f32 on the CPU.
pub fn load_init_noise(path: &Path) -> anyhow::Result<Tensor> {
    let store = TensorStore::open_file(path)?;
    let t = store.get("init_noise", None, DType::F32, &Device::Cpu)?;
    if t.rank() != 4 || t.dim(0)? != 1 {
        bail!(
            "{}: init_noise: expected shape [1, C, h, w], got {:?}",
            path.display(),
            t.dims()
        );
    }
    Ok(t)
}

/// An image size in pixels and where it came from, for messages.
#[derive(Debug, Clone)]
pub struct ImageSize {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// The flags, file or config key that gave it: `--width 100000 (--height 64)`.
    pub source: String,
}

/// The image size in pixels: `--height`/`--width` when given, else the initial noise's size, else
/// the UNet's sample size, times the VAE factor; with where each came from.
pub fn image_size(
    pipe: &StableDiffusionPipeline,
    init_noise: Option<(&Path, &Tensor)>,
    &SizeArgs { height, width }: &SizeArgs,
) -> anyhow::Result<ImageSize> {
    let f = pipe.vae_scale_factor();
    let unet_config = pipe.unet_config_file.display();
    let (default_h, default_w, default_source) = match init_noise {
        Some((path, n)) => (n.dim(2)?, n.dim(3)?, format!("--init-noise {}", path.display())),
        None => {
            let (h, w) = pipe.unet.sample_size().unwrap_or((64, 64));
            (h, w, format!("{unet_config}: sample_size"))
        }
    };
    let pixels = |latent: usize| {
        latent
            .checked_mul(f)
            .with_context(|| format!("{default_source}: {latent} latents are too many pixels"))
    };
    let mut sources = Vec::new();
    let mut pick = |flag: &str, given: Option<usize>, latent: usize| -> anyhow::Result<usize> {
        Ok(match given {
            Some(v) => {
                sources.push(format!("{flag} {v}"));
                v
            }
            None => pixels(latent)?,
        })
    };
    let h = pick("--height", height, default_h)?;
    let w = pick("--width", width, default_w)?;
    if sources.len() < 2 {
        sources.push(format!("{default_source} {default_h}x{default_w}"));
    }
    Ok(ImageSize {
        height: h,
        width: w,
        source: sources.join(", "),
    })
}

/// Fails, naming where the size came from, when a job of `batch` images at `size` (latent
/// `latent`) would need more memory than the machine has available (see
/// [`diffalign::sampling::budget`]); `retained_calls` counts the UNet calls whose activations
/// are kept at once. Checked before the first large allocation.
pub fn check_memory(
    pipe: &StableDiffusionPipeline,
    size: &ImageSize,
    latent: (usize, usize),
    guided: bool,
    retained_calls: usize,
) -> anyhow::Result<()> {
    let Some(available) = budget::available_memory() else {
        return Ok(());
    };
    let estimate = pipe.memory_estimate(1, guided, latent, retained_calls);
    if let Some(why) = budget::shortfall(&estimate, pipe.device(), available) {
        bail!(
            "{}: at {}x{} pixels ({}x{} latents), {why}",
            size.source,
            size.width,
            size.height,
            latent.1,
            latent.0
        );
    }
    Ok(())
}

/// Parses a finite number for clap: `inf` and `NaN` parse as `f64` but mean nothing as a scale.
pub fn parse_finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("not a number: {s:?}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("must be a finite number, got {s}"))
    }
}

/// A model's usual sampling: steps and classifier-free guidance scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale (guidance runs only when > 1).
    pub guidance: f64,
    /// Whether the checkpoint is a one-step (Turbo-style) model.
    pub one_step: bool,
}

/// The sampling `pipe` is made for: one step without guidance for a Turbo-style checkpoint
/// (trailing timestep spacing, see [`StableDiffusionPipeline::is_few_step`]); the demo's DDIM
/// settings for the embedded shapes-world model (`embedded`); otherwise diffusers' defaults,
/// 50 steps with guidance 7.5 (5.0 for SDXL).
pub fn sampling_defaults(pipe: &StableDiffusionPipeline, embedded: bool) -> SamplingDefaults {
    if pipe.is_few_step() {
        return SamplingDefaults {
            steps: 1,
            guidance: 0.0,
            one_step: true,
        };
    }
    if embedded {
        let demo = diffalign::shapes::demo::DemoConfig::full();
        return SamplingDefaults {
            steps: demo.steps,
            guidance: demo.guidance,
            one_step: false,
        };
    }
    SamplingDefaults {
        steps: 50,
        guidance: pipe.kind.default_guidance(),
        one_step: false,
    }
}

/// Parses `--reward KIND=PATH` for clap.
pub fn parse_reward_spec(s: &str) -> Result<RewardSpec, String> {
    s.parse().map_err(|e: diffalign::Error| e.to_string())
}

/// The `--reward` list, or the embedded shapes-world reward (`clipscore`) when none is given.
pub fn reward_specs_or_default(specs: &[RewardSpec]) -> anyhow::Result<Vec<RewardSpec>> {
    if !specs.is_empty() {
        return Ok(specs.to_vec());
    }
    Ok(vec![RewardSpec {
        kind: diffalign::reward::RewardKind::ClipScore,
        path: diffalign::shapes::assets::shapes_reward_dir(&super::assets_cache())?,
    }])
}

/// Loads every `--reward` (each kind at most once), naming the kind and folder on failure.
pub fn load_rewards(specs: &[RewardSpec], opts: &LoadOptions) -> anyhow::Result<Vec<Box<dyn ImageReward>>> {
    let mut seen = BTreeSet::new();
    for spec in specs {
        if !seen.insert(spec.kind) {
            bail!("--reward: {} given twice", spec.kind);
        }
    }
    specs
        .iter()
        .map(|spec| {
            load_reward(spec.kind, &spec.path, opts)
                .with_context(|| format!("loading the {} reward from {}", spec.kind, spec.path.display()))
        })
        .collect()
}

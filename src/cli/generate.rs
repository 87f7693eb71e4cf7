//! `diffalign generate`: text to images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use diffalign::rng::Rng;
use diffalign::sampling::image_io::save_png;
use diffalign::sampling::GenerateRequest;
use diffalign::schedulers::SchedulerKind;

use super::inputs::{check_memory, image_size, load_init_noise, parse_finite, PromptArgs, SizeArgs};
use super::model_args::ModelArgs;

/// Flags of `diffalign generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Images per prompt; image k of a prompt uses seed `seed + k`.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Negative prompt (an explicit empty string counts as given).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps (1 for Turbo models).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale; guidance runs only when > 1 (use 0 for Turbo models).
    /// Default: 7.5, or 5.0 for SDXL pipelines, as diffusers.
    #[arg(long, value_parser = parse_finite)]
    guidance: Option<f64>,
    #[command(flatten)]
    size: SizeArgs,
    #[command(flatten)]
    npo: super::npo_args::NpoArgs,
    /// Seed of the initial noise (and of any sampler noise).
    #[arg(long, default_value_t = 0, conflicts_with = "init_noise")]
    seed: u64,
    /// A safetensors file with a tensor `init_noise` of shape [1, 4, h, w]: the unscaled initial
    /// latent noise (diffusers' `latents=`).
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Sampler: ddim, euler, euler-a, pndm, dpm++, lms, unipc, ddpm or a diffusers class name
    /// (default: the checkpoint's scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    /// Output PNG. With several images, `NAME-<prompt>-<image>.png` beside it.
    #[arg(long)]
    out: PathBuf,
}

/// Output path of image `k` of prompt `p` when several are written.
fn numbered(out: &Path, p: usize, k: usize) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    out.with_file_name(format!("{stem}-{p:03}-{k}.png"))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompts = args.prompt.read()?;
    if args.num_images == 0 {
        bail!("--num-images: must be at least 1");
    }
    if args.steps == 0 {
        bail!("--steps: must be at least 1");
    }
    if args
        .out
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        != Some("png".into())
    {
        bail!("--out: expected a .png path, got {}", args.out.display());
    }
    let scheduler = args.scheduler.as_deref().map(str::parse::<SchedulerKind>).transpose()?;
    let init_noise = args.init_noise.as_deref().map(load_init_noise).transpose()?;
    if init_noise.is_some() && (prompts.len() > 1 || args.num_images > 1) {
        bail!("--init-noise: gives the noise of one image; use it with one --prompt and --num-images 1");
    }
    let pipe = args.model.load_pipeline()?;
    let negative_unet = args.npo.load(&args.model)?;
    for w in &pipe.warnings {
        eprintln!("warning: {w}");
    }
    let noise_source = args.init_noise.as_deref().zip(init_noise.as_ref());
    let size = image_size(&pipe, noise_source, &args.size)?;
    let (height, width) = (size.height, size.width);
    let (lh, lw) = pipe.check_size(height, width).with_context(|| size.source.clone())?;
    let guidance = args.guidance.unwrap_or(pipe.kind.default_guidance());
    check_memory(&pipe, &size, (lh, lw), guidance > 1.0, 1)?;

    let total = prompts.len() * args.num_images;
    let bar = super::progress_bar("generating", (total * args.steps) as u64);
    let mut written = Vec::with_capacity(total);
    for (p, prompt) in prompts.iter().enumerate() {
        for k in 0..args.num_images {
            let seed = args.seed + k as u64;
            let noise = match &init_noise {
                Some(n) => n.clone(),
                None => Rng::new(seed).randn((1, pipe.unet.in_channels(), lh, lw), &Device::Cpu)?,
            };
            let req = GenerateRequest {
                negative_prompts: args.negative_prompt.clone().map(|n| vec![n]),
                scheduler,
                ..GenerateRequest::new(prompt.clone(), noise, seed, args.steps, guidance, (height, width))
            };
            let done = bar.position();
            let out = pipe
                .generate_npo(&pipe.unet, negative_unet.as_ref(), &req, &mut |i, _| {
                    bar.set_position(done + i as u64)
                })?
                .images;
            let path = if total == 1 {
                args.out.clone()
            } else {
                numbered(&args.out, p, k)
            };
            save_png(&out.get(0)?, &path)?;
            written.push(serde_json::json!({"path": path, "prompt": prompt, "seed": seed}));
        }
    }
    bar.finish_and_clear();
    for w in written {
        println!("{w}");
    }
    Ok(())
}

//! `diffalign eval`: a tuned model (a LoRA or a UNet folder) against its base, from the same
//! prompts and seeds, scored by reward models. With `--npo-lora` the tuned side is guided with
//! Diffusion-NPO's negative-preference adapter, as `generate --npo-lora` guides (the tuned model
//! is then optional: the base UNet with NPO guidance against plain guidance).
//!
//! Writes `--out/images/NNN-SEED-{base,tuned}.png`, `--out/eval.json` (the summary and every
//! image's scores) and `--out/index.html` (the summary and same-seed pairs side by side), and
//! prints the summary as one JSON line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use diffalign::eval::{mean, WinRate};
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::reward::RewardSpec;
use diffalign::rng::Rng;
use diffalign::sampling::image_io::save_png;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::{GenerateRequest, StableDiffusionPipeline};
use diffalign::schedulers::SchedulerKind;
use diffalign::train::report::{write_report, ImageRow};
use diffalign::weights::lora::LoraSource;
use diffalign::weights::store::write_atomic;
use diffalign::weights::LoadOptions;

use super::inputs::{
    check_memory, image_size, load_rewards, parse_finite, parse_reward_spec, read_prompts, reward_specs_or_default,
    sampling_defaults, SizeArgs,
};
use super::model_args::ModelArgs;

/// Flags of `diffalign eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The base model, and the tuned one as `--lora FILE` (on the base UNet and, where it has
    /// text-encoder keys, the text encoders) or `--unet DIR`.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Diffusion-NPO guidance of the tuned side.
    #[command(flatten)]
    npo: super::npo_args::NpoArgs,
    /// A file with one prompt per line (blank lines skipped).
    #[arg(long)]
    prompts: PathBuf,
    /// A reward model as KIND=PATH, repeatable: pickscore, clipscore, hpsv2, aesthetic, imagereward. Default:
    /// the embedded shapes-world reward (a small CLIP, as clipscore).
    #[arg(long = "reward", value_parser = parse_reward_spec)]
    rewards: Vec<RewardSpec>,
    /// Seeds per prompt: 0..N, the same for base and tuned.
    #[arg(long, default_value_t = 4)]
    seeds: u64,
    /// Denoising steps. Default: 1 for a Turbo-style checkpoint (trailing timesteps), else the
    /// model's usual count (the demo's 8 for the embedded model, 50 otherwise).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale. Default: none for Turbo-style checkpoints, else the model's
    /// usual scale (the demo's 3 for the embedded model, 7.5, or 5.0 for SDXL, as diffusers).
    #[arg(long, value_parser = parse_finite)]
    guidance: Option<f64>,
    /// Sampler: ddim, euler, euler-a, pndm, dpm++, lms, unipc, ddpm or a diffusers class name
    /// (default: the checkpoint's scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    #[command(flatten)]
    size: SizeArgs,
    /// Output folder (created if needed).
    #[arg(long)]
    out: PathBuf,
}

/// The tuned side: a UNet run with the base pipeline's text encoders, or, for a LoRA with
/// text-encoder adapters, a whole pipeline of its own.
enum Tuned {
    Unet(Box<UNet2DConditionModel>),
    Pipeline(Box<StableDiffusionPipeline>),
}

/// The base pipeline and the tuned model; with `npo` (an NPO adapter guides the tuned side) the
/// tuned model defaults to the base UNet.
fn load_models(model: &ModelArgs, npo: bool) -> anyhow::Result<(StableDiffusionPipeline, Tuned)> {
    let (root, opts) = model.resolve()?;
    let base_opts = opts.without_lora();
    let sources = PipelineSources {
        root: root.clone(),
        vae: model.vae.clone(),
        unet: None,
    };
    let pipe = StableDiffusionPipeline::load(&sources, &base_opts)
        .with_context(|| format!("loading the base model {}", root.display()))?;
    let tuned = match (&model.unet, &model.lora) {
        (Some(_), Some(_)) => bail!("give the tuned model as --lora FILE or --unet DIR, not both"),
        (None, None) if npo => Tuned::Unet(Box::new(pipe.unet.clone())),
        (None, None) => bail!("give the tuned model: --lora FILE (on the base UNet), --unet DIR or --npo-lora FILE"),
        (Some(dir), None) => {
            let tuned = UNet2DConditionModel::from_pretrained(dir, &base_opts)
                .with_context(|| format!("loading the tuned UNet {}", dir.display()))?
                .0;
            pipe.check_unet_fits(&tuned, &dir.join("config.json"))?;
            Tuned::Unet(Box::new(tuned))
        }
        (None, Some(file)) => {
            let lora = LoraSource::from_file_all(file, false).context("--lora")?;
            let text_encoders = lora.component() != "unet" || !lora.others().is_empty();
            let opts = LoadOptions {
                lora: Some(Arc::new(lora)),
                ..base_opts
            };
            if text_encoders {
                let tuned = StableDiffusionPipeline::load(&sources, &opts)
                    .with_context(|| format!("applying --lora {}", file.display()))?;
                Tuned::Pipeline(Box::new(tuned))
            } else {
                let unet = UNet2DConditionModel::from_pretrained(&root.join("unet"), &opts)
                    .with_context(|| format!("applying --lora {}", file.display()))?
                    .0;
                Tuned::Unet(Box::new(unet))
            }
        }
    };
    Ok((pipe, tuned))
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(None, Some(&args.prompts))?;
    if args.seeds == 0 {
        bail!("--seeds: must be at least 1");
    }
    if args.steps == Some(0) {
        bail!("--steps: must be at least 1");
    }
    let scheduler = args.scheduler.as_deref().map(str::parse::<SchedulerKind>).transpose()?;
    let negative_unet = args.npo.load(&args.model)?;
    let (pipe, tuned) = load_models(&args.model, negative_unet.is_some())?;
    for w in &pipe.warnings {
        eprintln!("warning: {w}");
    }
    let rewards = load_rewards(
        &reward_specs_or_default(&args.rewards)?,
        &args.model.load_options()?.without_lora(),
    )?;
    let size = image_size(&pipe, None, &args.size)?;
    let (height, width) = (size.height, size.width);
    let (lh, lw) = pipe.check_size(height, width).with_context(|| size.source.clone())?;
    let defaults = sampling_defaults(&pipe, args.model.model.is_none());
    let steps = args.steps.unwrap_or(defaults.steps);
    let guidance = args.guidance.unwrap_or(defaults.guidance);
    check_memory(&pipe, &size, (lh, lw), guidance > 1.0, 1)?;
    let images_dir = args.out.join("images");
    std::fs::create_dir_all(&images_dir).with_context(|| format!("creating {}", images_dir.display()))?;

    let total = prompts.len() as u64 * args.seeds * 2 * steps as u64;
    let bar = super::progress_bar("eval", total);
    // scores[kind] = (base, tuned), one entry per (prompt, seed).
    let mut scores: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut records = Vec::new();
    let mut rows = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        for seed in 0..args.seeds {
            let noise = Rng::new(seed).randn((1, pipe.unet.in_channels(), lh, lw), &Device::Cpu)?;
            let req = GenerateRequest {
                scheduler,
                ..GenerateRequest::new(prompt.clone(), noise, seed, steps, guidance, (height, width))
            };
            let mut record = serde_json::json!({"prompt": prompt, "seed": seed});
            let mut paths = Vec::with_capacity(2);
            for side in ["base", "tuned"] {
                let done = bar.position();
                let mut progress = |i: usize, _| bar.set_position(done + i as u64);
                let image = match (side, &tuned) {
                    ("base", _) => pipe.generate_with(&pipe.unet, &req, &mut progress)?,
                    (_, Tuned::Unet(unet)) => pipe.generate_npo(unet, negative_unet.as_ref(), &req, &mut progress)?,
                    (_, Tuned::Pipeline(p)) => p.generate_npo(&p.unet, negative_unet.as_ref(), &req, &mut progress)?,
                }
                .images;
                let name = format!("{p:03}-{seed}-{side}.png");
                save_png(&image.get(0)?, &images_dir.join(&name))?;
                let nchw = image.permute((0, 3, 1, 2))?.to_device(pipe.device())?;
                let mut side_scores = serde_json::Map::new();
                for reward in &rewards {
                    let s = reward
                        .score(&nchw, prompt)
                        .with_context(|| format!("scoring {name} with {}", reward.kind()))?
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?[0];
                    let entry = scores.entry(reward.kind().name().to_string()).or_default();
                    if side == "base" { &mut entry.0 } else { &mut entry.1 }.push(s);
                    side_scores.insert(reward.kind().name().to_string(), s.into());
                }
                record[side] = serde_json::json!({"image": format!("images/{name}"), "scores": side_scores});
                paths.push(format!("images/{name}"));
            }
            rows.push(ImageRow {
                prompt: prompt.clone(),
                seed,
                before: paths[0].clone(),
                after: paths[1].clone(),
            });
            records.push(record);
        }
    }
    bar.finish_and_clear();

    let mut per_reward = serde_json::Map::new();
    let mut text = format!(
        "{} prompts x {} seeds, {} steps, guidance {guidance}\nreward: base mean -> tuned mean; win rate of tuned [95% Wilson interval]\n",
        prompts.len(),
        args.seeds,
        steps
    );
    for (kind, (base, tuned)) in &scores {
        let win = WinRate::from_scores(base, tuned).expect("one score per image on both sides");
        let (mb, mt) = (mean(base), mean(tuned));
        text.push_str(&format!(
            "{kind}: {mb:.4} -> {mt:.4}; {:.3} [{:.3}, {:.3}] ({} wins, {} ties of {})\n",
            win.rate, win.low, win.high, win.wins, win.ties, win.n
        ));
        per_reward.insert(
            kind.clone(),
            serde_json::json!({"base_mean": mb, "tuned_mean": mt, "win_rate": win}),
        );
    }
    let summary = serde_json::json!({
        "prompts": prompts.len(),
        "seeds": args.seeds,
        "rewards": per_reward,
    });
    let full = serde_json::json!({"summary": summary, "images": records});
    write_atomic(&args.out.join("eval.json"), serde_json::to_string_pretty(&full)?)?;
    write_report(&args.out.join("index.html"), "Tuned versus base", &text, &[], &rows)?;
    println!("{summary}");
    Ok(())
}

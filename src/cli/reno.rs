//! `diffalign reno`: ReNO noise optimisation against reward models (see [`diffalign::reno`]).
//!
//! For each prompt it writes, into `--out` (or `--out/NNN/` with a prompts file):
//! `iterations.jsonl` (one line per iteration, appended and flushed as it is computed),
//! `initial.png`, `best.png`, `best_noise.safetensors` (tensor `init_noise`, for
//! `generate --init-noise`) and `index.html` (the trajectory and both images). With a prompts file,
//! `--out/index.html` shows every prompt. One JSON summary line per prompt goes to stdout.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::Args;
use diffalign::reno::{IterationRecord, Reno, RenoConfig, RenoOutcome, Sampler, WeightedReward};
use diffalign::reward::{RewardKind, RewardSpec};
use diffalign::rng::Rng;
use diffalign::sampling::image_io::save_png;
use diffalign::sampling::pipeline::Conditioning;
use diffalign::schedulers::SchedulerKind;
use diffalign::train::report::{write_report, Curve, ImageRow};
use diffalign::weights::store::save_safetensors;

use super::inputs::{
    check_memory, image_size, load_init_noise, load_rewards, parse_finite, parse_reward_spec, reward_specs_or_default,
    sampling_defaults, PromptArgs, SizeArgs,
};
use super::model_args::ModelArgs;

/// Flags of `diffalign reno`.
#[derive(Debug, Args)]
pub struct RenoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// A reward model as KIND=PATH or KIND=PATH:W (W its loss weight, as `--weight KIND=W`),
    /// repeatable: pickscore, clipscore, hpsv2, aesthetic, imagereward. Default: the embedded
    /// shapes-world reward (a small CLIP, as clipscore).
    #[arg(long = "reward", value_parser = parse_weighted_reward)]
    rewards: Vec<(RewardSpec, Option<f64>)>,
    /// A reward's loss weight as KIND=W, replacing ReNO's default (hpsv2 5, clipscore 0.01,
    /// pickscore 0.05, imagereward 1, aesthetic 0).
    #[arg(long = "weight", value_parser = parse_weight)]
    weights: Vec<(RewardKind, f64)>,
    /// Use the log-sigmoid-centred loss `-w * logsigmoid(score - REF)` for a reward, as
    /// KIND=REF (its weight w is 1 unless `--weight` gives it); several such rewards combine as
    /// the log-probability of beating every reference (Wang et al. 2024).
    #[arg(long = "reward-ref", value_parser = parse_weight)]
    reward_refs: Vec<(RewardKind, f64)>,
    /// Iterations (evaluations of the noise; the last one is not followed by an update).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 5.0, value_parser = parse_finite)]
    lr: f64,
    /// Nesterov momentum.
    #[arg(long, default_value_t = 0.9, value_parser = parse_finite)]
    momentum: f64,
    /// Maximum L2 norm of the gradient on the noise before each step; 0 disables clipping.
    #[arg(long, default_value_t = 0.1, value_parser = parse_finite)]
    grad_clip: f64,
    /// Weight of the noise-norm regulariser `0.5|z|^2 - (d-1) log|z|`.
    #[arg(long, default_value_t = 0.01, value_parser = parse_finite)]
    reg_weight: f64,
    /// Seed of the initial noise (and of any noise a stochastic sampler adds).
    #[arg(long, default_value_t = 0, conflicts_with = "init_noise")]
    seed: u64,
    /// A safetensors file with a tensor `init_noise` [1, C, h, w]: the initial noise.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Sampling steps with the checkpoint's scheduler, all differentiated. Default: 1 for a
    /// Turbo-style checkpoint (trailing timesteps), else the model's usual count (the demo's 8
    /// for the embedded model, 50 otherwise).
    #[arg(long, conflicts_with = "timestep")]
    steps: Option<usize>,
    /// One Euler step from this timestep to the image, for models without a one-step schedule.
    #[arg(long, value_parser = parse_finite)]
    timestep: Option<f64>,
    /// Sampler: ddim, euler, euler-a, pndm, dpm++, lms, unipc, ddpm or a diffusers class name
    /// (default: the checkpoint's scheduler).
    #[arg(long, conflicts_with = "timestep")]
    scheduler: Option<String>,
    /// Classifier-free guidance scale; guidance runs only when > 1. Default: none for Turbo-style
    /// checkpoints, else the model's usual scale (the demo's 3 for the embedded model, 7.5, or 5
    /// for SDXL).
    #[arg(long, value_parser = parse_finite)]
    guidance: Option<f64>,
    #[command(flatten)]
    size: SizeArgs,
    /// Recompute activations block by block in the backward pass (UNet, VAE decoder, reward
    /// image towers): much less memory for about one extra forward per iteration.
    #[arg(long)]
    recompute: bool,
    /// Output folder (created if needed); with --prompts, one folder in it per prompt.
    #[arg(long)]
    out: PathBuf,
}

/// `KIND=PATH` or `KIND=PATH:W`: a trailing `:W` that parses as a finite number is the weight
/// (a folder whose name ends in `:<number>` needs `--weight` instead).
fn parse_weighted_reward(s: &str) -> Result<(RewardSpec, Option<f64>), String> {
    if let Some((spec, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.trim().parse::<f64>() {
            if !w.is_finite() {
                return Err(format!("{s:?}: the weight must be finite, got {w}"));
            }
            return Ok((parse_reward_spec(spec)?, Some(w)));
        }
    }
    Ok((parse_reward_spec(s)?, None))
}

fn parse_weight(s: &str) -> Result<(RewardKind, f64), String> {
    let (kind, w) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KIND=NUMBER (e.g. pickscore=0.05), got {s:?}"))?;
    let kind: RewardKind = kind.trim().parse().map_err(|e: diffalign::Error| e.to_string())?;
    let w: f64 = w.trim().parse().map_err(|_| format!("{kind}: not a number: {w:?}"))?;
    if !w.is_finite() {
        return Err(format!("{kind}: must be finite, got {w}"));
    }
    Ok((kind, w))
}

pub fn run(args: RenoArgs) -> anyhow::Result<()> {
    let prompts = args.prompt.read()?;
    let given: Vec<RewardSpec> = args.rewards.iter().map(|(spec, _)| spec.clone()).collect();
    let specs = reward_specs_or_default(&given)?;
    let inline = args.rewards.iter().filter_map(|(spec, w)| w.map(|w| (spec.kind, w)));
    let weights: HashMap<RewardKind, f64> = inline.chain(args.weights.iter().copied()).collect();
    let refs: HashMap<RewardKind, f64> = args.reward_refs.iter().copied().collect();
    for (flag, kind) in weights
        .keys()
        .map(|k| ("--weight", k))
        .chain(refs.keys().map(|k| ("--reward-ref", k)))
    {
        if !specs.iter().any(|r| r.kind == *kind) {
            bail!("{flag} {kind}: no --reward {kind}=PATH given");
        }
    }
    let init_noise = args.init_noise.as_deref().map(load_init_noise).transpose()?;
    if args.steps == Some(0) {
        bail!("--steps: must be at least 1");
    }
    let scheduler = args.scheduler.as_deref().map(str::parse::<SchedulerKind>).transpose()?;
    let config = RenoConfig {
        iters: args.iters,
        lr: args.lr,
        momentum: args.momentum,
        grad_clip: (args.grad_clip != 0.0).then_some(args.grad_clip),
        reg_weight: args.reg_weight,
    };

    let pipe = args.model.load_pipeline()?;
    for w in &pipe.warnings {
        eprintln!("warning: {w}");
    }
    let defaults = sampling_defaults(&pipe, args.model.model.is_none());
    let steps = args.steps.unwrap_or(defaults.steps);
    let guidance = args.guidance.unwrap_or(defaults.guidance);
    if steps == 1 && !defaults.one_step && args.timestep.is_none() {
        eprintln!(
            "warning: --steps 1: this checkpoint is made for a multi-step sampler (its scheduler does not \
             space timesteps `trailing` as Turbo models do), so one step gives noise; its usual \
             count is {}",
            defaults.steps
        );
    }
    let sampler = match args.timestep {
        Some(t) => Sampler::Timestep(t),
        None => Sampler::Scheduler { kind: scheduler, steps },
    };
    let opts = args.model.load_options()?;
    let rewards: Vec<WeightedReward> = load_rewards(&specs, &opts)?
        .into_iter()
        .map(|r| {
            let kind = r.kind();
            let centred = refs.get(&kind).copied();
            // The centred loss is on a log-probability scale: weight 1 unless given.
            let w = weights.get(&kind).copied().or(centred.map(|_| 1.0));
            let mut wr = WeightedReward::new(r, w);
            wr.loss.centred = centred;
            wr
        })
        .collect();
    if args.recompute {
        pipe.unet.set_gradient_checkpointing(true);
        pipe.vae.set_gradient_checkpointing(true);
        for r in &rewards {
            r.reward.set_gradient_checkpointing(true);
        }
    }
    let reno = Reno::new(&pipe, &rewards, sampler, config, args.seed)?;

    let noise_source = args.init_noise.as_deref().zip(init_noise.as_ref());
    let size = image_size(&pipe, noise_source, &args.size)?;
    let (height, width) = (size.height, size.width);
    let (lh, lw) = pipe.check_size(height, width).with_context(|| size.source.clone())?;
    // Every step's activations are kept for the backward pass (about three forwards' worth
    // each), or one forward's with recomputation.
    let differentiated = match args.timestep {
        Some(_) => 1,
        None => steps,
    };
    let retained = if args.recompute {
        differentiated
    } else {
        3 * differentiated
    };
    check_memory(&pipe, &size, (lh, lw), guidance > 1.0, retained)?;
    let z0 = match init_noise {
        Some(n) => {
            let want = [1, pipe.unet.in_channels(), lh, lw];
            if n.dims() != want {
                bail!(
                    "--init-noise: init_noise has shape {:?}, but a {height}x{width} image needs {want:?}",
                    n.dims()
                );
            }
            n
        }
        None => Rng::new(args.seed).randn((1, pipe.unet.in_channels(), lh, lw), &Device::Cpu)?,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;

    let bar = super::progress_bar("reno", (prompts.len() * args.iters) as u64);
    let mut rows = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        let dir = if prompts.len() == 1 {
            args.out.clone()
        } else {
            args.out.join(format!("{p:03}"))
        };
        let cond = pipe.conditioning(std::slice::from_ref(prompt), None, guidance, (height, width), None)?;
        let outcome = optimise_prompt(&reno, args.seed, &cond, prompt, &z0, &dir, &bar)?;
        let summary = serde_json::json!({
            "prompt": prompt,
            "out": dir,
            "best_iter": outcome.best_iter,
            "initial": outcome.records[0].scores_json(),
            "best": outcome.records[outcome.best_iter].scores_json(),
        });
        bar.suspend(|| println!("{summary}"));
        if prompts.len() > 1 {
            rows.push(ImageRow {
                prompt: prompt.clone(),
                seed: args.seed,
                before: format!("{p:03}/initial.png"),
                after: format!("{p:03}/best.png"),
            });
        }
    }
    bar.finish_and_clear();
    if !rows.is_empty() {
        let summary = format!("{} prompts; each folder has its own trajectory.", rows.len());
        write_report(&args.out.join("index.html"), "ReNO", &summary, &[], &rows)?;
    }
    Ok(())
}

/// Runs ReNO for one prompt into `dir`. Each iteration's line is flushed as it is computed and the
/// images are replaced atomically, so an error (a non-finite gradient, say) leaves every file
/// valid; the page is written either way.
fn optimise_prompt(
    reno: &Reno,
    seed: u64,
    cond: &Conditioning,
    prompt: &str,
    z0: &Tensor,
    dir: &Path,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<RenoOutcome> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let jsonl = dir.join("iterations.jsonl");
    let mut file = std::fs::File::create(&jsonl).with_context(|| format!("creating {}", jsonl.display()))?;
    let mut records: Vec<IterationRecord> = Vec::new();
    let mut best_loss = f64::INFINITY;
    let to_hwc = |image: &Tensor| -> diffalign::Result<Tensor> { Ok(image.get(0)?.permute((1, 2, 0))?) };
    let result = reno.run_with(cond, prompt, z0, &mut |record, tensors| {
        let mut line = record.to_json().to_string();
        line.push('\n');
        file.write_all(line.as_bytes())
            .and_then(|_| file.flush())
            .map_err(|e| diffalign::Error::io(&jsonl, e))?;
        if record.iter == 0 {
            save_png(&to_hwc(&tensors.image)?, &dir.join("initial.png"))?;
        }
        if record.reward_loss < best_loss {
            best_loss = record.reward_loss;
            save_png(&to_hwc(&tensors.image)?, &dir.join("best.png"))?;
            let noise = HashMap::from([("init_noise".to_string(), tensors.noise.clone())]);
            save_safetensors(&dir.join("best_noise.safetensors"), &noise, None)?;
        }
        records.push(record.clone());
        bar.set_message(format!("reward loss {:.4}", record.reward_loss));
        bar.inc(1);
        Ok(())
    });
    write_page(dir, prompt, seed, &records)?;
    result.with_context(|| {
        format!(
            "ReNO for prompt {prompt:?} (what was written to {} is valid)",
            dir.display()
        )
    })
}

/// The per-prompt page: one curve per score and loss, and the initial and best images.
fn write_page(dir: &Path, prompt: &str, seed: u64, records: &[IterationRecord]) -> anyhow::Result<()> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        let x = r.iter as f64;
        series.entry("reward loss".into()).or_default().push((x, r.reward_loss));
        series.entry("regulariser".into()).or_default().push((x, r.reg_loss));
        for (k, s) in &r.scores {
            series.entry(format!("{k} score")).or_default().push((x, *s));
        }
    }
    let curves: Vec<Curve> = series
        .iter()
        .map(|(title, points)| Curve {
            title,
            points: points.clone(),
        })
        .collect();
    let best = records
        .iter()
        .min_by(|a, b| a.reward_loss.total_cmp(&b.reward_loss))
        .map(|r| r.iter);
    let summary = format!(
        "prompt: {prompt}\niterations: {}\nbest iteration (lowest reward loss): {}",
        records.len(),
        best.map_or("none".into(), |b| b.to_string())
    );
    let rows = if records.is_empty() {
        Vec::new()
    } else {
        vec![ImageRow {
            prompt: prompt.to_string(),
            seed,
            before: "initial.png".into(),
            after: "best.png".into(),
        }]
    };
    write_report(&dir.join("index.html"), "ReNO trajectory", &summary, &curves, &rows)?;
    Ok(())
}

//! `diffalign pretrain`: trains a small Stable Diffusion pipeline from scratch on the shapes world
//! (VAE, then text encoder + UNet) and writes it as a diffusers folder; see
//! [`diffalign::shapes::pretrain`]. `pipelines/pretrain-shapes.toml` reproduces `assets/shapes`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use diffalign::shapes::pretrain::{pretrain, pretrain_reward, PretrainRecipe};
use indicatif::ProgressBar;

/// Flags of `diffalign pretrain`.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// The recipe (relative paths in it are relative to the working directory).
    recipe: PathBuf,
    /// Override the number of steps of both phases (for a quick check).
    #[arg(long)]
    steps: Option<usize>,
    /// Override the output folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the reward model's folder.
    #[arg(long)]
    reward_out: Option<PathBuf>,
    /// Run only the pipeline phases (VAE, denoiser) or only the reward model.
    #[arg(long, value_parser = ["pipeline", "reward"])]
    only: Option<String>,
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let mut recipe = PretrainRecipe::load(&args.recipe, Path::new(""))?;
    if let Some(n) = args.steps {
        recipe.vae.steps = n;
        recipe.denoiser.steps = n;
        if let Some(r) = &mut recipe.reward {
            r.steps = n;
        }
    }
    if let Some(out) = args.out {
        recipe.output.dir = out;
    }
    if let (Some(out), Some(r)) = (args.reward_out, &mut recipe.reward) {
        r.dir = out;
    }
    std::fs::create_dir_all(&recipe.output.dir).with_context(|| format!("creating {}", recipe.output.dir.display()))?;
    let log_path = recipe.output.dir.join("pretrain.jsonl");
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let start = std::time::Instant::now();
    let mut bar: Option<(String, ProgressBar)> = None;
    let mut ema: Option<f64> = None;
    let mut report = |phase: &str, step: usize, steps: usize, loss: f64| {
        if bar.as_ref().is_none_or(|(p, _)| p != phase) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = super::progress_bar(&format!("pretrain {phase}"), steps as u64);
            bar = Some((phase.to_string(), b));
            ema = None;
        }
        let smooth = ema.map_or(loss, |e| 0.98 * e + 0.02 * loss);
        ema = Some(smooth);
        if let Some((_, b)) = &bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {smooth:.4}"));
        }
        if step % 10 == 0 || step == steps {
            let line = serde_json::json!({"phase": phase, "step": step, "loss": loss, "elapsed_s": start.elapsed().as_secs_f64()});
            let _ = writeln!(log, "{line}");
        }
    };
    let mut written = Vec::new();
    if args.only.as_deref() != Some("reward") {
        written.push(pretrain(&recipe, &mut report)?);
    }
    if args.only.as_deref() != Some("pipeline") && recipe.reward.is_some() {
        written.push(pretrain_reward(&recipe, &mut report)?);
    }
    if let Some((_, b)) = bar {
        b.finish();
    }
    println!(
        "{}",
        serde_json::json!({"output": written, "seconds": start.elapsed().as_secs_f64()})
    );
    Ok(())
}

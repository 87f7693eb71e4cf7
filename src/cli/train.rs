//! `diffalign train RECIPE.toml`: preference fine-tuning from a recipe.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use diffalign::recipe::Plan;
use diffalign::train::{TrainOptions, Trainer};
use diffalign::weights::layout;
use indicatif::{ProgressBar, ProgressStyle};

use super::device_arg::DeviceArg;

/// Flags of `diffalign train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe (see `pipelines/`).
    recipe: PathBuf,
    /// Override a recipe key: `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// Stop after N optimizer steps in this run, writing a checkpoint (continue with --resume).
    #[arg(long)]
    max_steps_this_run: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let plan = Plan::load(&args.recipe, &args.sets)?;
    let out = plan.raw.output.dir.clone();
    let opts = TrainOptions {
        resume: args.resume,
        max_steps_this_run: args.max_steps_this_run,
        device: args.device.device()?,
        hub_cache: layout::hub_cache_dir(|k| std::env::var(k).ok()),
    };
    let mut trainer = Trainer::new(plan, &opts).with_context(|| format!("setting up {}", args.recipe.display()))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} training [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(trainer.step_count() as u64);
    trainer.run(&opts, &mut |r, total| {
        bar.set_length(total as u64);
        bar.set_position(r.step as u64);
        let acc = r.implicit_acc.map(|a| format!(" acc {a:.2}")).unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}{acc}{}",
            r.loss,
            if r.skipped { " (skipped)" } else { "" }
        ));
    })?;
    bar.finish_and_clear();
    println!("{}", serde_json::json!({"output": out, "steps": trainer.step_count()}));
    Ok(())
}

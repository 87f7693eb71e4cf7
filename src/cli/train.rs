//! `diffalign train RECIPE.toml`: preference fine-tuning from a recipe, in one process or in
//! the several that `mpirun`, `mpiexec` or `srun` start (built with the `mpi` feature) or
//! `torchrun` starts (built with the `nccl` feature), each rank on its own GPU.

use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use diffalign::data::skipped::{describe, summary_lines, SHOWN_SKIPPED, SKIPPED_FILE};
use diffalign::dist::{Comm, Launch};
use diffalign::models::unet::UNet2DConditionConfig;
use diffalign::models::vae::AutoencoderKLConfig;
use diffalign::recipe::Plan;
use diffalign::sampling::budget::{self, TrainingJob};
use diffalign::train::{Resume, TrainOptions, Trainer};
use diffalign::weights::layout;

use super::device_arg::DeviceArg;

/// Flags of `diffalign train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe (see `pipelines/`).
    recipe: PathBuf,
    /// Override a recipe key: `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue from the newest checkpoint in the output folder (none is an error).
    #[arg(long, conflicts_with = "resume_if_possible")]
    resume: bool,
    /// Continue from the newest checkpoint when there is one, else start fresh (for job
    /// schedulers that restart a job blindly).
    #[arg(long)]
    resume_if_possible: bool,
    /// Resume even when the recipe changed in a key that alters the run (method, objective,
    /// data, model, LoRA shape, ...), recording the change in metrics.jsonl.
    #[arg(long)]
    allow_recipe_change: bool,
    /// Stop after N optimizer steps in this run, writing a checkpoint (continue with --resume).
    #[arg(long)]
    max_steps_this_run: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let launch = Launch::from_env(|k| std::env::var(k).ok())?;
    let device = launch.rank_device(args.device.spec).device()?;
    let comm = Rc::new(Comm::connect(&launch, &device)?);
    let result = train(args, device, comm.clone());
    if let (Err(e), true) = (&result, comm.size() > 1) {
        // The other ranks would wait for this one in their next collective: end them all.
        eprintln!("error (rank {} of {}): {e:#}", comm.rank(), comm.size());
        comm.abort(1);
    }
    result
}

fn train(args: TrainArgs, device: Device, comm: Rc<Comm>) -> anyhow::Result<()> {
    let main = comm.is_main();
    let plan = Plan::load(&args.recipe, &args.sets)?;
    let out = plan.raw.output.dir.clone();
    // `[data] unpaired = true` batches labelled images; `pairs_used` then counts images.
    let unit = if plan.raw.data.unpaired { "images" } else { "pairs" };
    let resume = match (args.resume, args.resume_if_possible) {
        (true, _) => Resume::Required,
        (_, true) => Resume::IfPossible,
        _ => Resume::Never,
    };
    let opts = TrainOptions {
        resume,
        allow_recipe_change: args.allow_recipe_change,
        max_steps_this_run: args.max_steps_this_run,
        device,
        hub_cache: layout::hub_cache_dir(|k| std::env::var(k).ok()),
        comm,
    };
    check_plan_fits(&plan, &opts)?;
    let mut trainer = Trainer::new(plan, &opts).with_context(|| format!("setting up {}", args.recipe.display()))?;
    if !main {
        // Rank 0 reports for the run.
        return Ok(trainer.run(&opts, &mut |_, _| {})?);
    }
    for note in trainer.notes() {
        eprintln!("note: {note}");
    }
    for line in summary_lines(trainer.skipped_records(), SHOWN_SKIPPED) {
        eprintln!("skipped {line}");
    }
    // Records found bad during training are named while fewer than SHOWN_SKIPPED were, then counted.
    let mut shown = trainer.skipped_records().len().min(SHOWN_SKIPPED);
    let mut unshown = 0;
    let bar = super::progress_bar("training", 0);
    bar.set_position(trainer.step_count() as u64);
    trainer.run(&opts, &mut |r, total| {
        for s in &r.bad_records {
            if shown < SHOWN_SKIPPED {
                // `println` prints nothing when stderr is not a terminal; `suspend` always does.
                bar.suspend(|| eprintln!("skipped {}", describe(s)));
                shown += 1;
            } else {
                unshown += 1;
            }
        }
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
    if unshown > 0 {
        eprintln!("skipped ... and {unshown} more while training");
    }
    let skipped = trainer.skipped_records().len();
    eprintln!(
        "used {} {unit}, skipped {skipped} records{}",
        trainer.pairs_used(),
        if skipped > 0 {
            format!(" (all listed in {})", out.join(SKIPPED_FILE).display())
        } else {
            String::new()
        }
    );
    println!(
        "{}",
        serde_json::json!({
            "output": out,
            "steps": trainer.step_count(),
            "pairs_used": trainer.pairs_used(),
            "records_skipped": skipped,
        })
    );
    Ok(())
}

/// Fails, naming the recipe and its keys, when `train.resolution` is not a multiple of the VAE's
/// factor or one training step would need more memory than the machine has available; read
/// from the model's configs before any weight or image loads. A model without a diffusers
/// `unet/config.json` and `vae/config.json` is left to the trainer, which names what is missing.
fn check_plan_fits(plan: &Plan, opts: &TrainOptions) -> anyhow::Result<()> {
    let r = &plan.raw;
    let hub = opts.hub_cache.as_deref();
    let root = layout::resolve_model(&r.model.path, hub, r.model.revision.as_deref())?;
    let vae_dir = match &r.model.vae {
        Some(v) => layout::resolve_model(v, hub, None)?,
        None => root.join("vae"),
    };
    let (unet_path, vae_path) = (root.join("unet/config.json"), vae_dir.join("config.json"));
    if !unet_path.is_file() || !vae_path.is_file() {
        return Ok(());
    }
    let unet = UNet2DConditionConfig::from_file(&unet_path)?;
    let vae = AutoencoderKLConfig::from_file(&vae_path)?;
    let (t, recipe) = (&r.train, plan.source.display());
    let factor = vae.downscale_factor();
    if t.resolution % factor != 0 {
        bail!(
            "{recipe}: train.resolution: must be a positive multiple of {factor} (the factor of {}), got {}",
            vae_path.display(),
            t.resolution
        );
    }
    let Some(available) = budget::available_memory() else {
        return Ok(());
    };
    let side = t.resolution / factor;
    let job = TrainingJob {
        // The trainer runs a micro-batch pair by pair, whatever `batch_size`.
        pairs: 1,
        latent: (side, side),
        dtype: plan.dtype,
        device: &opts.device,
        reference: plan.objective.needs_reference(),
        full_fine_tune: r.lora.is_none(),
        optimizer_state: t.optimizer_config().state_bytes_per_param(),
    };
    let estimate = budget::estimate_training(&job, &unet, &vae);
    if let Some(why) = budget::shortfall(&estimate, &opts.device, available) {
        bail!("train.resolution = {} in {recipe}: {why}", t.resolution);
    }
    Ok(())
}

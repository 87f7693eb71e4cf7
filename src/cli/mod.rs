//! Subcommands. Each file owns one command's flags (clap derive) and its run function.

mod bench;
mod bench_kernels;
mod demo;
mod eval;
mod generate;
mod inputs;
mod lm;
mod lora;
mod loss;
mod model_args;
mod pretrain;
mod reno;
mod score;
mod train;

use clap::{Parser, Subcommand};

/// Align text-to-image diffusion models with human preferences.
#[derive(Debug, Parser)]
#[command(name = "diffalign", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum Command {
    /// Run the whole framework on the embedded shapes-world model: pairs, DPO/DCPO/MaPO/SmPO, ReNO, evaluation.
    Demo(demo::DemoArgs),
    /// Generate images from text with a Stable Diffusion 1.x / 2.x / XL / Turbo pipeline.
    Generate(generate::GenerateArgs),
    /// Compute one preference loss (dpo, dcpo, mapo, smpo) on one batch, with metrics and gradients.
    Loss(loss::LossArgs),
    /// Fine-tune a model from preference pairs with a recipe (see `pipelines/`).
    Train(train::TrainArgs),
    /// Train a small text-to-image pipeline from scratch on the shapes world (the embedded model).
    Pretrain(pretrain::PretrainArgs),
    /// Score images for a prompt with reward models (one JSON line per image).
    Score(score::ScoreArgs),
    /// Optimise the initial noise of a one-step model against reward models (ReNO).
    Reno(reno::RenoArgs),
    /// Compare a tuned model (LoRA or UNet) with its base on the same prompts and seeds by rewards.
    Eval(eval::EvalArgs),
    /// Merge a LoRA into a UNet, or convert a LoRA between diffusers/PEFT and kohya forms.
    Lora(lora::LoraArgs),
    /// Language-model preference components: losses, reward models, training, RewardBench.
    Lm(lm::LmArgs),
    /// Time the hot paths on CPU (one JSON line per measurement).
    Bench(bench::BenchArgs),
}

/// A progress bar labelled `label` over `len` units, with elapsed time, ETA and a message.
pub(crate) fn progress_bar(label: &str, len: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {label:<14} [{{bar:30}}] {{pos}}/{{len}} {{elapsed_precise}} eta {{eta}} {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    b
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The library reads it lazily and takes a value it cannot parse as "none"; say so up front.
    if let Ok(spec) = std::env::var("DIFFALIGN_CUDA_KERNELS") {
        diffalign::ops::parse_cuda_kernels(&spec).map_err(anyhow::Error::msg)?;
    }
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Lora(args) => lora::run(args),
        Command::Score(args) => score::run(args),
        Command::Reno(args) => reno::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Loss(args) => loss::run(args),
        Command::Train(args) => train::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Lm(args) => lm::run(args),
    }
}

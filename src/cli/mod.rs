//! Subcommands. Each file owns one command's flags (clap derive) and its run function.

mod bench;
mod bench_kernels;
mod convert;
mod demo;
mod device_arg;
mod eval;
mod generate;
mod inputs;
mod lm;
mod lora;
mod loss;
mod loss_kto;
mod model_args;
mod npo_args;
mod pretrain;
mod reno;
mod score;
mod train;

use clap::{Parser, Subcommand};
use diffalign::device::DeviceSpec;
use diffalign::ops::KernelConfig;

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
    /// Run the whole framework on the embedded shapes-world model: pairs, DPO/DCPO/MaPO/SmPO, KTO, NPO, DRaFT, ReNO, evaluation.
    Demo(demo::DemoArgs),
    /// Generate images from text with a Stable Diffusion 1.x / 2.x / XL / Turbo pipeline.
    Generate(generate::GenerateArgs),
    /// Compute one preference loss (dpo, dcpo, mapo, smpo, kto, npo) on one batch, with metrics and gradients.
    Loss(loss::LossArgs),
    /// Fine-tune a model from preference pairs, labelled images or rewards with a recipe (see `pipelines/`).
    Train(train::TrainArgs),
    /// Train a small text-to-image pipeline from scratch on the shapes world (the embedded model).
    Pretrain(pretrain::PretrainArgs),
    /// Score images for a prompt with reward models (one JSON line per image).
    Score(score::ScoreArgs),
    /// Optimise the initial noise of a text-to-image model against reward models (ReNO).
    Reno(reno::RenoArgs),
    /// Compare a tuned model (LoRA or UNet) with its base on the same prompts and seeds by rewards.
    Eval(eval::EvalArgs),
    /// Merge a LoRA into a UNet, or convert a LoRA between diffusers/PEFT and kohya forms.
    Lora(lora::LoraArgs),
    /// Rewrite a PyTorch checkpoint (.ckpt, .pt, .bin; no code is run) as a .safetensors file.
    Convert(convert::ConvertArgs),
    /// Language-model preference components: losses, reward models, training, RewardBench.
    Lm(lm::LmArgs),
    /// Time the hot paths on CPU (one JSON line per measurement).
    Bench(bench::BenchArgs),
}

/// Where the embedded models are written (`DIFFALIGN_CACHE`, `XDG_CACHE_HOME`, `HOME`).
pub(crate) fn assets_cache() -> std::path::PathBuf {
    diffalign::shapes::assets::cache_root(|k| std::env::var_os(k))
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

impl Command {
    /// The command's `--device` (the CPU for commands without one).
    fn device(&self) -> DeviceSpec {
        match self {
            Command::Demo(a) => a.device.spec,
            Command::Generate(a) => a.model.device.spec,
            Command::Loss(a) => a.model.device.spec,
            Command::Train(a) => a.device.spec,
            Command::Score(a) => a.device.spec,
            Command::Reno(a) => a.model.device.spec,
            Command::Eval(a) => a.model.device.spec,
            Command::Lm(a) => a.device(),
            Command::Bench(a) => a.device.spec,
            Command::Pretrain(_) | Command::Lora(_) | Command::Convert(_) => DeviceSpec::Cpu,
        }
    }

    /// The kernel choice: `--device`, `DIFFALIGN_KERNELS` and `DIFFALIGN_CUDA_KERNELS`, and
    /// what the command itself asks for (`bench --composed`, `bench --suite kernels` on CUDA).
    fn kernel_config(&self) -> anyhow::Result<KernelConfig> {
        let var = |k: &str| std::env::var(k).ok();
        let mut config = KernelConfig::from_settings(
            self.device(),
            var("DIFFALIGN_KERNELS").as_deref(),
            var("DIFFALIGN_CUDA_KERNELS").as_deref(),
        )?;
        if let Command::Bench(a) = self {
            a.adjust_kernels(&mut config);
        }
        Ok(config)
    }
}

/// Runs the parsed command line: puts its kernel choice in force, then runs the command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    diffalign::ops::install(&cli.command.kernel_config()?)?;
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Lora(args) => lora::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Score(args) => score::run(args),
        Command::Reno(args) => reno::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Loss(args) => loss::run(args),
        Command::Train(args) => train::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Lm(args) => lm::run(args),
    }
}

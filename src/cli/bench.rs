//! `diffalign bench`: CPU timings of the hot paths on a fixed config with random weights, one
//! JSON line per measurement, so numbers are comparable from one change to the next and with
//! PyTorch on the same machine (`benches/pytorch_unet.py` measures the same things).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use diffalign::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffalign::models::vae::AutoencoderKLConfig;
use diffalign::rng::Rng;
use diffalign::sampling::budget::{self, Job, MemoryEstimate, Part, BACKWARD_FACTOR};
use diffalign::weights::VarBuilder;

use super::device_arg::DeviceArg;

/// Which measurements to run.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Suite {
    /// UNet forward, and forward + backward to every weight, at batch 2.
    Unet,
    /// One Diffusion-DPO step on one pair: policy forward + backward and reference forward, each
    /// on the batch of 2 (preferred, rejected).
    DpoStep,
    /// One ReNO iteration: one-step generation (UNet, VAE decoder), CLIP score, backward to the
    /// noise, clipping and the SGD step (needs --vae-config and --clip-config).
    Reno,
    /// Every fused kernel against its composed reference, forward and forward + backward, at
    /// `unet-mid` sizes (no --config needed).
    Kernels,
    /// Summed completion log-probabilities of a causal LM plus backward to every weight (one
    /// policy step of the LM preference losses); `--config` is a transformers Llama config.
    Lm,
}

/// Flags of `diffalign bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The measurements to run.
    #[arg(long, value_enum, default_value = "unet")]
    suite: Suite,
    /// A diffusers UNet `config.json` (e.g. `../shared/bench/unet-mid/config.json`); a
    /// transformers Llama config for suite lm; not used by suite kernels.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A diffusers `AutoencoderKL` `config.json` (suite reno; e.g. `../shared/bench/vae-mid`).
    #[arg(long)]
    vae_config: Option<PathBuf>,
    /// A transformers `CLIPModel` `config.json` (suite reno; e.g. `../shared/bench/clip-mid`).
    #[arg(long)]
    clip_config: Option<PathBuf>,
    /// Latent height and width.
    #[arg(long, default_value_t = 32)]
    latent_size: usize,
    /// Text states per sample.
    #[arg(long, default_value_t = 77)]
    text_len: usize,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Tokens per row (suite lm; the second half of each row is the completion).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Recompute activations block by block in backward passes (suites dpo-step and reno).
    #[arg(long, alias = "gradient-checkpointing")]
    recompute: bool,
    /// Suite dpo-step: train a fresh LoRA of this rank on the attention projections of a frozen
    /// UNet, whose adapters-off pass is the reference (one copy of the weights), instead of
    /// every weight against a second UNet.
    #[arg(long, value_name = "RANK")]
    lora: Option<usize>,
    /// Suite dpo-step: the dtype the UNet computes and stores its weights in (`f32`, `bf16`,
    /// `f16`); LoRA factors stay f32.
    #[arg(long, default_value = "f32", value_parser = parse_dtype_flag)]
    dtype: DType,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Suite kernels: only the cases whose op name starts with this (e.g. `attention`).
    #[arg(long)]
    op: Option<String>,
    /// Timed repetitions (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Run the composed reference ops instead of the fused kernels (A/B of whole steps; the
    /// same as `DIFFALIGN_KERNELS=reference`).
    #[arg(long)]
    composed: bool,
}

fn parse_dtype_flag(s: &str) -> Result<DType, String> {
    diffalign::device::parse_dtype(s).map_err(|e| e.to_string())
}

impl BenchArgs {
    /// `--composed` turns the fused kernels off; suite kernels on a CUDA device times our CUDA
    /// kernels, which are opt-in elsewhere.
    pub fn adjust_kernels(&self, config: &mut diffalign::ops::KernelConfig) {
        if self.composed {
            config.fused = false;
        }
        if matches!(self.suite, Suite::Kernels) && matches!(self.device.spec, diffalign::device::DeviceSpec::Cuda(_)) {
            config.cuda_ops = diffalign::ops::KernelOp::ALL.to_vec();
        }
    }

    /// `--config`, which every suite but kernels needs.
    fn config(&self) -> anyhow::Result<&PathBuf> {
        self.config
            .as_ref()
            .with_context(|| format!("--suite {:?} needs --config", self.suite))
    }
}

/// Median wall time in seconds of `repeats` runs of `f` on `dev` (waiting for the device to
/// finish each run), after one warm-up run.
pub(crate) fn median_secs(
    dev: &Device,
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Prints the peak resident memory line, when the platform reports it.
fn report_peak_rss() {
    if let Some(rss) = peak_rss_bytes() {
        println!(
            "{}",
            serde_json::json!({"bench": "peak_rss", "bytes": rss, "gib": rss as f64 / (1u64 << 30) as f64})
        );
    }
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.repeats == 0 {
        bail!("--repeats: must be at least 1");
    }
    match args.suite {
        Suite::Kernels => super::bench_kernels::run(&args.device.device()?, args.repeats, args.op.as_deref()),
        Suite::Unet => bench_unet(&args),
        Suite::DpoStep => bench_dpo_step(&args),
        Suite::Reno => bench_reno(&args),
        Suite::Lm => bench_lm(&args),
    }
}

/// F32 bytes per parameter.
const F32_BYTES: f64 = 4.0;

/// Fails, naming the config and the size flags, when `estimate` does not fit in the machine's
/// available memory; called before the suite allocates its random weights.
fn check_memory(args: &BenchArgs, sizes: &str, estimate: &MemoryEstimate, dev: &Device) -> anyhow::Result<()> {
    let Some(available) = budget::available_memory() else {
        return Ok(());
    };
    if let Some(why) = budget::shortfall(estimate, dev, available) {
        bail!("--config {} with {sizes}: {why}", args.config()?.display());
    }
    Ok(())
}

/// Checks a suite of UNet calls: `batch` rows at `--latent-size`, `retained` forwards' worth of
/// activations, `weight_copies` f32 copies of the UNet's parameters, and the VAE decoder when
/// the suite runs one.
fn check_unet_memory(
    args: &BenchArgs,
    cfg: &UNet2DConditionConfig,
    vae: Option<&AutoencoderKLConfig>,
    batch: usize,
    retained: usize,
    weight_copies: f64,
) -> anyhow::Result<()> {
    let dev = args.device.device()?;
    let s = args.latent_size;
    let calls = Job {
        batch,
        guided: false,
        latent: (s, s),
        dtype: DType::F32,
        device: &dev,
        retained_calls: retained,
    };
    let weights = Part {
        what: "the UNet's weights".into(),
        bytes: budget::unet_parameters(cfg) * F32_BYTES * weight_copies,
    };
    let estimate = match vae {
        Some(vae) => budget::with_weights(budget::estimate(&calls, cfg, vae), weights),
        None => budget::estimate_unet(&calls, cfg, weights),
    };
    check_memory(args, &format!("batch {batch}, --latent-size {s}"), &estimate, &dev)
}

fn bench_unet(args: &BenchArgs) -> anyhow::Result<()> {
    let cfg = UNet2DConditionConfig::from_file(args.config()?)?;
    // The trained UNet, its gradients and the frozen copy.
    check_unet_memory(args, &cfg, None, args.batch, BACKWARD_FACTOR, 3.0)?;
    let dev = args.device.device()?;
    let vb = VarBuilder::random(0, DType::F32, &dev, true);
    let unet = UNet2DConditionModel::new(&cfg, args.config()?, vb.clone()).context("building the UNet")?;
    let params: usize = vb.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let mut rng = Rng::new(1);
    let (b, s) = (args.batch, args.latent_size);
    let x = rng.randn((b, unet.in_channels(), s, s), &dev)?;
    let ctx = rng.randn((b, args.text_len, unet.cross_attention_dim()), &dev)?;
    let t = Tensor::from_vec((0..b).map(|i| (100 + 400 * i) as f32).collect::<Vec<_>>(), b, &dev)?;
    let target = rng.randn((b, unet.in_channels(), s, s), &dev)?;
    let threads = candle_core::utils::get_num_threads();
    let shape = format!(
        "unet {params} params, batch {b}, latents {}x{s}x{s}, text {}x{}",
        unet.in_channels(),
        args.text_len,
        unet.cross_attention_dim()
    );

    // Forward only: no graph is kept, as in a no-grad PyTorch forward.
    let frozen = frozen_unet(&cfg, args, DType::F32)?;
    let fwd = median_secs(&dev, args.repeats, || {
        frozen.forward(&x, &t, &ctx, None)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    report("unet_forward", &shape, fwd, threads);
    let step = median_secs(&dev, args.repeats, || {
        let y = unet.forward(&x, &t, &ctx, None)?;
        let loss = (y - &target)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        std::hint::black_box(grads);
        Ok(())
    })?;
    report("unet_forward_backward", &shape, step, threads);
    report_peak_rss();
    Ok(())
}

fn bench_dpo_step(args: &BenchArgs) -> anyhow::Result<()> {
    use diffalign::preference::diffusion::{DiffusionPreference, Method, PairConditioning, PreferenceBatch, Reference};
    use diffalign::weights::lora::{LoraConfig, LoraSource, DEFAULT_TARGETS};
    use std::sync::Arc;

    /// What the reference pass runs.
    enum BenchReference {
        Unet(Box<UNet2DConditionModel>),
        AdaptersOff(diffalign::weights::LoraSwitch),
    }
    use diffalign::preference::{LossType, Objective};
    use diffalign::schedulers::{NoiseSchedule, SchedulerConfig};

    let cfg = UNet2DConditionConfig::from_file(args.config()?)?;
    // The pair through the policy (kept for the backward) and the reference; the policy, its
    // gradients and the reference, or with a LoRA the one frozen UNet.
    let weight_copies = if args.lora.is_some() { 1.0 } else { 3.0 };
    check_unet_memory(args, &cfg, None, 2, BACKWARD_FACTOR + 1, weight_copies)?;
    let dev = args.device.device()?;
    let (policy, reference) = match args.lora {
        Some(rank) => {
            let lora = LoraConfig {
                rank,
                alpha: rank as f64,
                target_modules: DEFAULT_TARGETS.map(String::from).to_vec(),
                init_seed: 0,
            };
            let vb = VarBuilder::random(0, args.dtype, &dev, false).with_lora(Arc::new(LoraSource::fresh(&lora)));
            let policy = UNet2DConditionModel::new(&cfg, args.config()?, vb.clone())?;
            let switch = vb.lora_switch().context("the LoRA builder has a switch")?.clone();
            (policy, BenchReference::AdaptersOff(switch))
        }
        None => {
            let policy_vb = VarBuilder::random(0, args.dtype, &dev, true);
            let policy = UNet2DConditionModel::new(&cfg, args.config()?, policy_vb)?;
            (
                policy,
                BenchReference::Unet(Box::new(frozen_unet(&cfg, args, args.dtype)?)),
            )
        }
    };
    policy.set_gradient_checkpointing(args.recompute);
    let schedule = NoiseSchedule::from_config(&SchedulerConfig::from_json(
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
        "(bench scheduler)",
    )?)?;
    let mut rng = Rng::new(2);
    let s = args.latent_size;
    let c = policy.in_channels();
    let batch = PreferenceBatch {
        latents_w: rng.randn((1, c, s, s), &dev)?,
        latents_l: rng.randn((1, c, s, s), &dev)?,
        noise: rng.randn((1, c, s, s), &dev)?,
        timesteps: Tensor::new(&[500f32], &dev)?,
        soft_label: None,
        time_ids: None,
        captions_w: vec![String::new()],
        captions_l: vec![String::new()],
    };
    let ctx = rng.randn((1, args.text_len, policy.cross_attention_dim()), &dev)?;
    // SDXL layouts (`text_time`): pooled text embeddings and the time ids of a square image.
    let added = match (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) {
        (Some(t), Some(p)) if policy.needs_added_cond() => {
            let px = (s * 8) as f32;
            Some(diffalign::models::unet::AddedCond {
                text_embeds: rng.randn((1, p.saturating_sub(6 * t)), &dev)?,
                time_ids: Tensor::new(&[[px, px, 0.0, 0.0, px, px]], &dev)?,
            })
        }
        _ => None,
    };
    let cond = PairConditioning {
        context_w: ctx.clone(),
        context_l: ctx,
        added_w: added.clone(),
        added_l: added,
    };
    let eval = DiffusionPreference {
        policy: &policy,
        reference: Some(match &reference {
            BenchReference::Unet(unet) => Reference::Unet(unet),
            BenchReference::AdaptersOff(switch) => Reference::PolicyWithoutAdapters(switch),
        }),
        schedule: &schedule,
        method: Method::Dpo,
        objective: Objective::Dpo {
            loss_type: LossType::Sigmoid,
            beta: 5000.0,
            label_smoothing: 0.0,
        },
    };
    let threads = candle_core::utils::get_num_threads();
    let shape = format!(
        "{} DPO step ({}, {}): one pair, latents {c}x{s}x{s}, text {}x{}, recompute {}",
        config_name(args.config()?),
        match args.lora {
            Some(rank) => format!("LoRA rank {rank}"),
            None => "every weight".into(),
        },
        format!("{:?}", args.dtype).to_lowercase(),
        args.text_len,
        policy.cross_attention_dim(),
        args.recompute
    );
    let secs = median_secs(&dev, args.repeats, || {
        let out = eval.loss(&batch, &cond)?;
        std::hint::black_box(out.loss.loss.backward()?);
        Ok(())
    })?;
    report("dpo_step", &shape, secs, threads);
    report_peak_rss();
    Ok(())
}

fn bench_reno(args: &BenchArgs) -> anyhow::Result<()> {
    use diffalign::models::clip::vision_model::{ClipKeyLayout, ClipVisionConfig, ClipVisionModel};
    use diffalign::models::vae::AutoencoderKL;
    use diffalign::optim::{clip_grad_norm, Sgd};
    use diffalign::reno::noise_regularizer;
    use diffalign::reward::{l2_normalize, ClipPreprocess};
    use diffalign::schedulers::{EulerDiscreteScheduler, NoiseSchedule, Scheduler, SchedulerConfig};

    let vae_path = args.vae_config.as_ref().context("--suite reno needs --vae-config")?;
    let clip_path = args.clip_config.as_ref().context("--suite reno needs --clip-config")?;
    let dev = args.device.device()?;
    let unet_cfg = UNet2DConditionConfig::from_file(args.config()?)?;
    let vae_cfg = AutoencoderKLConfig::from_file(vae_path)?;
    // One differentiated generation through the frozen UNet and the VAE decoder.
    check_unet_memory(args, &unet_cfg, Some(&vae_cfg), 1, BACKWARD_FACTOR, 1.0)?;
    let unet = frozen_unet(&unet_cfg, args, DType::F32)?;
    let vae = AutoencoderKL::new(&vae_cfg, vae_path, VarBuilder::random(1, DType::F32, &dev, false))?;
    let clip_cfg = ClipVisionConfig::from_file(clip_path)?;
    let clip = ClipVisionModel::new(
        &clip_cfg,
        ClipKeyLayout::Transformers,
        VarBuilder::random(2, DType::F32, &dev, false).pp("vision_model"),
    )?;
    let preprocess = ClipPreprocess::new(clip_cfg.image_size);
    unet.set_gradient_checkpointing(args.recompute);
    vae.set_gradient_checkpointing(args.recompute);
    clip.set_gradient_checkpointing(args.recompute);
    let schedule = NoiseSchedule::from_config(&SchedulerConfig::from_json(
        r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "trailing"}"#,
        "(bench scheduler)",
    )?)?;
    let mut rng = Rng::new(3);
    let s = args.latent_size;
    let c = unet.in_channels();
    let ctx = rng.randn((1, args.text_len, unet.cross_attention_dim()), &dev)?;
    let text = rng.randn((1, clip_cfg.projection_dim), &dev)?;
    let text = l2_normalize(&text)?;
    let mut z = rng.randn((1, c, s, s), &dev)?;
    let mut sgd = Sgd::new(5.0, 0.9, true);
    let shape = format!(
        "{} + {} + {}: noise {c}x{s}x{s}, image {}x{}, CLIP {}x{}, recompute {}",
        config_name(args.config()?),
        config_name(vae_path),
        config_name(clip_path),
        s * vae_cfg.downscale_factor(),
        s * vae_cfg.downscale_factor(),
        clip_cfg.image_size,
        clip_cfg.image_size,
        args.recompute
    );
    let secs = median_secs(&dev, args.repeats, || {
        let var = candle_core::Var::from_tensor(&z)?;
        let mut sched = EulerDiscreteScheduler::new(&schedule, schedule.one_step_sigmas(999.0)?);
        let latents = (var.as_tensor() * sched.init_noise_sigma())?;
        let input = sched.scale_model_input(&latents, 0)?;
        let t = Tensor::new(&[999f32], &dev)?;
        let eps = unet.forward(&input, &t, &ctx, None)?;
        let x0 = sched.step(&eps, 0, &latents, &mut rng)?;
        let decoded = vae.decode(&(x0 / vae_cfg.scaling_factor)?)?;
        let image = ((decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let embeds = l2_normalize(&clip.forward(&preprocess.forward(&image)?)?.image_embeds)?;
        let score = (embeds.broadcast_mul(&text)?.sum_all()? * 100.0)?;
        let loss = ((score.affine(-0.05, 0.05 * 30.0))? + noise_regularizer(var.as_tensor(), 0.01)?)?;
        let grads = loss.backward()?;
        let mut g = [grads.get(var.as_tensor()).context("no gradient on the noise")?.clone()];
        clip_grad_norm(&mut g, Some(0.1))?;
        z = sgd.step(&z, &g[0])?;
        Ok(())
    })?;
    report("reno_iteration", &shape, secs, candle_core::utils::get_num_threads());
    report_peak_rss();
    Ok(())
}

fn bench_lm(args: &BenchArgs) -> anyhow::Result<()> {
    use diffalign::lm::batch::Sequences;
    use diffalign::lm::completion_logps;
    use diffalign::models::llama::{LlamaConfig, LlamaForCausalLM};
    let cfg = LlamaConfig::from_file(args.config()?)?;
    let dev = args.device.device()?;
    // The weights and their gradients; the logits of every token, kept for the backward.
    let logits = Part {
        what: format!("the LM's logits over {} tokens", args.batch * args.seq),
        bytes: (args.batch * args.seq * cfg.vocab_size * BACKWARD_FACTOR) as f64 * F32_BYTES,
    };
    let alone = MemoryEstimate {
        device: logits.bytes,
        host: 0.0,
        largest: logits,
    };
    let weights = Part {
        what: "the LM's weights and their gradients".into(),
        bytes: 2.0 * cfg.parameter_count() * F32_BYTES,
    };
    let estimate = budget::with_weights(alone, weights);
    check_memory(
        args,
        &format!("--batch {} --seq {}", args.batch, args.seq),
        &estimate,
        &dev,
    )?;
    let vb = VarBuilder::random(0, DType::F32, &dev, true);
    let lm = LlamaForCausalLM::new(&cfg, vb.clone()).context("building the LM")?;
    let params: usize = vb.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let (b, t) = (args.batch, args.seq);
    let mut rng = Rng::new(1);
    let rows: Vec<(Vec<u32>, usize)> = (0..b)
        .map(|_| {
            (
                (0..t)
                    .map(|_| 3 + rng.below(cfg.vocab_size as u64 - 3) as u32)
                    .collect(),
                t / 2,
            )
        })
        .collect();
    let seq = Sequences::from_rows(&rows, 0, &dev)?;
    let vars: Vec<candle_core::Tensor> = vb.vars().iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let threads = candle_core::utils::get_num_threads();
    let secs = median_secs(&dev, args.repeats, || {
        let (logp, _) = completion_logps(&lm, &seq)?;
        let grads = logp.sum_all()?.backward()?;
        anyhow::ensure!(vars.iter().all(|v| grads.get(v).is_some()), "a weight got no gradient");
        Ok(())
    })?;
    let shape = format!("llama {params} params, batch {b}, seq {t}");
    report("lm_logp_backward", &shape, secs, threads);
    report_peak_rss();
    Ok(())
}

/// The same architecture with constant (non-`Var`) weights, so the forward records no graph.
/// The name of the configuration `config` is (its folder's name, e.g. `unet-mid`, or the file's
/// stem), for the `shape` of benchmark lines.
fn config_name(config: &std::path::Path) -> String {
    let folder = config.parent().and_then(|p| p.file_name());
    let stem = match config.file_stem() {
        Some(s) if s != "config" => Some(s),
        _ => folder,
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| config.display().to_string())
}

fn frozen_unet(cfg: &UNet2DConditionConfig, args: &BenchArgs, dtype: DType) -> anyhow::Result<UNet2DConditionModel> {
    let vb = VarBuilder::random(0, dtype, &args.device.device()?, false);
    Ok(UNet2DConditionModel::new(cfg, args.config()?, vb)?)
}

fn report(name: &str, shape: &str, secs: f64, threads: usize) {
    println!(
        "{}",
        serde_json::json!({
            "bench": name,
            "shape": shape,
            "median_s": secs,
            "threads": threads,
            "impl": "diffalign",
            "cpu": diffalign::device::cpu_model(),
            "isa": diffalign::device::cpu_isa(),
        })
    );
}

//! `diffalign loss`: one preference loss on one given batch, with its metrics and gradients, so
//! that the implementation can be checked against another one.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::Args;
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::preference::diffusion::{DiffusionPreference, Method, PreferenceBatch, Reference};
use diffalign::preference::{LossType, Objective};
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::schedulers::NoiseSchedule;
use diffalign::train::pair_conditioning;
use diffalign::weights::lora::LoraSource;
use diffalign::weights::{save_safetensors, LoadOptions};
use std::sync::Arc;

use super::model_args::ModelArgs;

/// The loss settings beyond its type and beta, shared by `loss`, `lm loss` and `lm train`.
#[derive(Debug, Args)]
pub struct LossParams {
    /// Label smoothing eps of sigmoid, robust, exo_pair, aot and simpo.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// SimPO's target margin gamma (default 0.5).
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    /// DiscoPOP's tau (default 0.05).
    #[arg(long)]
    pub discopop_tau: Option<f64>,
}

impl LossParams {
    /// `loss_type` with `--simpo-gamma` / `--discopop-tau` applied (an error for other losses).
    pub fn apply(&self, loss_type: LossType) -> anyhow::Result<LossType> {
        let mut t = loss_type;
        if let Some(g) = self.simpo_gamma {
            t = t.with_simpo_gamma(g)?;
        }
        if let Some(tau) = self.discopop_tau {
            t = t.with_discopop_tau(tau)?;
        }
        Ok(t)
    }
}

/// Flags of `diffalign loss`.
#[derive(Debug, Args)]
pub struct LossArgs {
    /// The model; its own UNet is the frozen reference, `--unet` (a full UNet folder) or
    /// `--lora` (an adapter on the model's UNet) the policy (default: a copy of the reference).
    #[command(flatten)]
    pub model: ModelArgs,
    /// dpo, dcpo, mapo, smpo or kto (kto reads a labelled batch: `latents`, `noise`,
    /// `timesteps`, `labels`, metadata `captions`).
    #[arg(long)]
    method: String,
    /// Beta (default: the paper's: dpo 5000, dcpo 500, mapo 0.1, smpo 2000, kto 5000).
    #[arg(long)]
    beta: Option<f64>,
    /// Loss form of dpo, dcpo and smpo, TRL's names: sigmoid, hinge, ipo, robust, exo_pair,
    /// nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop,
    /// sigmoid_norm, simpo, orpo (the last two need no reference).
    #[arg(long, default_value = "sigmoid")]
    loss_type: String,
    #[command(flatten)]
    loss_params: LossParams,
    #[command(flatten)]
    kto: super::loss_kto::KtoArgs,
    /// The batch: `latents_w`, `latents_l`, `noise`, `timesteps`, [`soft_label`], [`time_ids`],
    /// metadata `captions_w`, [`captions_l`].
    #[arg(long)]
    batch: PathBuf,
    /// SmPO's inverse-DDIM steps over the schedule.
    #[arg(long, default_value_t = 5)]
    inversion_steps: usize,
    /// Write the gradient of every trainable tensor here, under its checkpoint name.
    #[arg(long)]
    grads_out: Option<PathBuf>,
}

fn to_list(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Fails, naming the file and record, on a soft label outside [0.5, 1]: the probability that the
/// preferred image wins, the range `train` accepts for its data.
fn check_soft_labels(batch: &PreferenceBatch, file: &std::path::Path) -> anyhow::Result<()> {
    let Some(labels) = &batch.soft_label else {
        return Ok(());
    };
    for (i, p) in labels.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().enumerate() {
        if !(0.5..=1.0).contains(&p) {
            bail!(
                "{}: soft_label: record {i}: must be in [0.5, 1] (the probability that the preferred image wins), got {p}",
                file.display()
            );
        }
    }
    Ok(())
}

/// Writes the gradient of `loss` on every `trainable` tensor (zeros where it has none) to
/// `path`, under the tensors' checkpoint names.
pub(super) fn write_grads(
    loss: &Tensor,
    trainable: Vec<(String, candle_core::Var)>,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let grads = loss.backward()?;
    let mut tensors = HashMap::new();
    for (name, var) in trainable {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        tensors.insert(name, g);
    }
    save_safetensors(path, &tensors, None)?;
    Ok(())
}

pub fn run(args: LossArgs) -> anyhow::Result<()> {
    let method = Method::parse(&args.method, args.inversion_steps)?;
    let loss_type = args.loss_params.apply(args.loss_type.parse()?)?;
    let objective = Objective::for_method(method, args.beta, loss_type, args.loss_params.label_smoothing)?;
    let objective = args.kto.apply(method, objective)?;
    let (root, opts) = args.model.resolve()?;
    let sources = PipelineSources {
        root: root.clone(),
        vae: args.model.vae.clone(),
        unet: None,
    };
    let policy_dir = args.model.unet.clone().unwrap_or_else(|| root.join("unet"));
    // A `--lora` policy trains the adapter on the frozen UNet; otherwise every UNet weight trains.
    let policy_opts = match &args.model.lora {
        Some(path) => LoadOptions {
            lora: Some(Arc::new(LoraSource::from_file(path, "unet", true).context("--lora")?)),
            ..opts.without_lora()
        },
        None => LoadOptions {
            trainable: true,
            ..opts.without_lora()
        },
    };
    let load_policy = || {
        UNet2DConditionModel::from_pretrained(&policy_dir, &policy_opts)
            .with_context(|| format!("loading the policy UNet {}", policy_dir.display()))
    };
    let loading = || format!("loading {}", root.display());
    // The reference is the model's own UNet, never adapted: with a LoRA on that UNet, the
    // policy with its adapters off (one copy of the weights); else a UNet of its own.
    let shares_base = args.model.lora.is_some() && args.model.unet.is_none();
    let (pipe, (policy, policy_vb)) = if shares_base {
        let (policy, vb) = load_policy()?;
        let pipe = StableDiffusionPipeline::load_with_unet(&sources, &opts.without_lora(), policy.clone())
            .with_context(loading)?;
        (pipe, (policy, vb))
    } else {
        let pipe = StableDiffusionPipeline::load(&sources, &opts.without_lora()).with_context(loading)?;
        (pipe, load_policy()?)
    };
    pipe.check_unet_fits(&policy, &policy_dir.join("config.json"))?;
    let reference = match policy_vb.lora_switch().filter(|_| shares_base) {
        Some(switch) => Reference::PolicyWithoutAdapters(switch),
        None => Reference::Unet(&pipe.unet),
    };
    let trainable = if args.model.lora.is_some() {
        policy_vb.lora_vars()
    } else {
        policy_vb.vars()
    };
    let schedule = NoiseSchedule::from_config(&pipe.scheduler_config)?;
    let eval = DiffusionPreference {
        policy: &policy,
        reference: Some(reference),
        schedule: &schedule,
        method,
        objective,
    };
    if method == Method::Kto {
        return super::loss_kto::run(&pipe, &eval, &args.batch, args.grads_out.as_deref(), trainable);
    }
    let batch = PreferenceBatch::from_file(&args.batch)?;
    check_soft_labels(&batch, &args.batch)?;
    let cond = pair_conditioning(&pipe, &batch, method)?;
    let out = eval.loss(&batch, &cond)?;

    if let Some(path) = &args.grads_out {
        write_grads(&out.loss.loss, trainable, path)?;
    }

    let m = &out.loss.metrics;
    let mut report = serde_json::json!({
        "method": method.name(),
        "loss": m.loss,
        "implicit_acc": m.implicit_acc,
        "reward_margin": m.reward_margin,
        "mse_w": to_list(&out.mse_w)?,
        "mse_l": to_list(&out.mse_l)?,
    });
    if let Objective::Dpo { loss_type, beta, .. } = objective {
        report["loss_type"] = loss_type.to_string().into();
        report["beta"] = beta.into();
    }
    if let Some((w, l)) = &out.ref_mse {
        report["ref_mse_w"] = to_list(w)?.into();
        report["ref_mse_l"] = to_list(l)?.into();
    }
    println!("{report}");
    Ok(())
}

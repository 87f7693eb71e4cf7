//! `diffalign lm`: language-model preference commands on the shared preference core.
//!
//! - `lm loss`: one batch's DPO-family loss, log-probabilities, metrics and (optionally) the
//!   gradient of every policy weight.
//! - `lm reward`: a reward model's rewards (BT) or embeddings and pair scores (GPM) for a batch.
//! - `lm train`: DPO-family fine-tuning of a causal LM on pairs.
//! - `lm train-rm`: a Bradley-Terry or GPM reward model trained on pairs.
//! - `lm eval-rm`: a reward model on RewardBench-format data (per-subset accuracy, section scores).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use diffalign::lm::batch::PairBatch;
use diffalign::lm::data::{check_positions, load_examples, load_pairs, pair_seqs};
use diffalign::lm::reward_model::{HeadKind, RewardModel, RewardOutput};
use diffalign::models::llama::{LlamaConfig, LlamaForCausalLM};
use diffalign::optim::{AdafactorConfig, AdamW8bitConfig, AdamWConfig, OptimizerConfig};
use diffalign::preference::heads::gpm_score;
use diffalign::preference::kto::Kto;
use diffalign::preference::{metrics, LossType, Objective};
use diffalign::train::lm::{self as lm_train, HeadSettings, LmStepRecord, PolicyData, TrainSettings};
use diffalign::weights::lora::LoraConfig;
use diffalign::weights::{save_safetensors, LoadOptions};

use super::device_arg::DeviceArg;
use super::loss::LossParams;
use diffalign::device::DeviceSpec;

/// Flags of `diffalign lm`.
#[derive(Debug, Args)]
pub struct LmArgs {
    #[command(subcommand)]
    command: LmCommand,
}

#[derive(Debug, Subcommand)]
enum LmCommand {
    /// One batch's preference loss, log-probabilities and metrics as one JSON object.
    Loss(LossArgs),
    /// A reward model's outputs for a batch as one JSON object.
    Reward(RewardArgs),
    /// DPO-family fine-tuning of a causal LM on preference pairs.
    Train(TrainArgs),
    /// Train a Bradley-Terry or General Preference reward model on preference pairs.
    TrainRm(TrainRmArgs),
    /// Evaluate a reward model on RewardBench-format pairs.
    EvalRm(EvalRmArgs),
}

/// The loss type, beta and the other loss settings.
#[derive(Debug, Args)]
struct ObjectiveArgs {
    /// The loss, TRL's names: sigmoid, hinge, ipo, robust, exo_pair, nca_pair, bco_pair,
    /// sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, simpo, orpo;
    /// `lm train` also takes kto (unpaired data; pairs are split into desirable and undesirable).
    #[arg(long, default_value = "sigmoid")]
    loss_type: String,
    /// Beta (TRL's default 0.1; ORPO's lambda; SimPO's beta).
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    #[command(flatten)]
    params: LossParams,
}

impl ObjectiveArgs {
    fn objective(&self) -> anyhow::Result<Objective> {
        let loss_type = self.params.apply(self.loss_type.parse::<LossType>()?)?;
        Ok(Objective::dpo(loss_type, self.beta, self.params.label_smoothing)?)
    }
}

#[derive(Debug, Args)]
struct LossArgs {
    /// The policy: a transformers causal-LM folder (Llama, Mistral, Qwen2).
    #[arg(long)]
    policy: PathBuf,
    /// The frozen reference (needed by every loss but simpo and orpo).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// A pre-tokenised batch: `input_ids_{w,l}`, `attention_mask_{w,l}`, `completion_mask_{w,l}`.
    #[arg(long)]
    batch: PathBuf,
    #[command(flatten)]
    objective: ObjectiveArgs,
    /// Write the gradient of every policy weight here, under its checkpoint name.
    #[arg(long)]
    grads_out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Debug, Args)]
struct RewardArgs {
    /// A reward model folder: a transformers `*ForSequenceClassification` (BT) or a GPM from `lm train-rm`.
    #[arg(long)]
    model: PathBuf,
    /// A pre-tokenised batch (as for `lm loss`).
    #[arg(long)]
    batch: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
}

/// Optimisation flags shared by `lm train` and `lm train-rm`.
#[derive(Debug, Args)]
struct OptimArgs {
    /// Training pairs: JSONL or parquet with `prompt`, `chosen`, `rejected` (tokenised with the
    /// model's tokenizer.json), or a pre-tokenised `.safetensors` batch. For KTO also JSONL with
    /// `prompt`, `completion`, `label` (true: desirable).
    #[arg(long)]
    data: PathBuf,
    /// Where the trained model, `metrics.jsonl` and the tokenizer go.
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Pairs per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Learning rate (constant).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Optimizer, with the defaults of `[train.optimizer]` but `--weight-decay`.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    optimizer: OptimizerKind,
    /// Weight decay of the optimizer.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of the batch order and of a new head.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out pairs evaluated before and after training (same formats as `--data`).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

impl OptimArgs {
    fn settings(&self) -> anyhow::Result<TrainSettings> {
        Ok(TrainSettings {
            device: self.device.device()?,
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            seed: self.seed,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            optimizer: self.optimizer.config(self.weight_decay),
        })
    }
}

/// `--optimizer`: the kinds of `[train.optimizer]`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OptimizerKind {
    /// AdamW, f32 moments.
    Adamw,
    /// bitsandbytes' 8-bit AdamW.
    Adamw8bit,
    /// transformers' Adafactor.
    Adafactor,
}

impl OptimizerKind {
    fn config(self, weight_decay: f64) -> OptimizerConfig {
        match self {
            OptimizerKind::Adamw => OptimizerConfig::AdamW(AdamWConfig {
                weight_decay,
                ..Default::default()
            }),
            OptimizerKind::Adamw8bit => OptimizerConfig::AdamW8bit(AdamW8bitConfig {
                weight_decay,
                ..Default::default()
            }),
            OptimizerKind::Adafactor => OptimizerConfig::Adafactor(AdafactorConfig {
                weight_decay,
                ..Default::default()
            }),
        }
    }
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// The starting policy (a transformers causal-LM folder); it is also the frozen reference.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    objective: ObjectiveArgs,
    /// Train LoRA adapters of this rank instead of every weight (saved in PEFT's format beside
    /// the merged weights).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha (default: the rank, a scale of 1).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Comma-separated modules the LoRA adapts (PEFT's suffix matching).
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
    lora_targets: String,
    /// KTO (`--loss-type kto`): weight of desirable examples.
    #[arg(long, default_value_t = 1.0)]
    desirable_weight: f64,
    /// KTO: weight of undesirable examples.
    #[arg(long, default_value_t = 1.0)]
    undesirable_weight: f64,
    #[command(flatten)]
    optim: OptimArgs,
}

#[derive(Debug, Args)]
struct TrainRmArgs {
    /// The backbone: a transformers causal-LM or sequence-classification folder.
    #[arg(long)]
    model: PathBuf,
    /// The head: bt (a scalar reward) or gpm (General Preference Model embedding).
    #[arg(long, default_value = "bt")]
    head: String,
    /// GPM embedding width 2k (even).
    #[arg(long, default_value_t = 6)]
    value_head_dim: usize,
    /// GPM: weigh the k blocks by a softmax gate read at the prompt's last token.
    #[arg(long)]
    prompt_gate: bool,
    /// Temperature of the pairwise logit: GPM's tau (default 0.1), BT's (default 1).
    #[arg(long)]
    tau: Option<f64>,
    #[command(flatten)]
    optim: OptimArgs,
}

#[derive(Debug, Args)]
struct EvalRmArgs {
    /// The reward model folder.
    #[arg(long)]
    model: PathBuf,
    /// RewardBench-format pairs: JSONL or parquet with `prompt`, `chosen`, `rejected`, `subset`.
    #[arg(long)]
    data: PathBuf,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Also write the report here (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

impl LmArgs {
    /// The subcommand's `--device`.
    pub fn device(&self) -> DeviceSpec {
        match &self.command {
            LmCommand::Loss(a) => a.device.spec,
            LmCommand::Reward(a) => a.device.spec,
            LmCommand::Train(a) => a.optim.device.spec,
            LmCommand::TrainRm(a) => a.optim.device.spec,
            LmCommand::EvalRm(a) => a.device.spec,
        }
    }
}

pub fn run(args: LmArgs) -> anyhow::Result<()> {
    match args.command {
        LmCommand::Loss(a) => loss(a),
        LmCommand::Reward(a) => reward(a),
        LmCommand::Train(a) => train(a),
        LmCommand::TrainRm(a) => train_rm(a),
        LmCommand::EvalRm(a) => eval_rm(a),
    }
}

fn list(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn load_lm(
    dir: &Path,
    device: &Device,
    trainable: bool,
) -> anyhow::Result<(LlamaForCausalLM, diffalign::weights::VarBuilder)> {
    let opts = LoadOptions {
        device: device.clone(),
        trainable,
        ..Default::default()
    };
    LlamaForCausalLM::from_pretrained(dir, &opts).with_context(|| format!("loading {}", dir.display()))
}

fn loss(args: LossArgs) -> anyhow::Result<()> {
    let objective = args.objective.objective()?;
    let device = args.device.device()?;
    if objective.needs_reference() && args.reference.is_none() {
        bail!("--loss-type {} needs --reference", args.objective.loss_type);
    }
    let batch = PairBatch::from_file(&args.batch, &device)?;
    for dir in std::iter::once(&args.policy).chain(&args.reference) {
        batch.check_positions(lm_config(dir)?.max_positions(), &args.batch)?;
    }
    let (policy, vb) = load_lm(&args.policy, &device, args.grads_out.is_some())?;
    let reference = args
        .reference
        .as_deref()
        .map(|d| load_lm(d, &device, false).map(|m| m.0))
        .transpose()?;
    let (loss, _, scores) = lm_train::policy_loss(&policy, reference.as_ref(), &objective, &batch)?;
    let (lw, ll) = (list(&scores.policy_w)?, list(&scores.policy_l)?);
    let (nw, nl) = scores
        .lengths
        .as_ref()
        .map(|(w, l)| (list(w), list(l)))
        .expect("lengths");
    let (nw, nl) = (nw?, nl?);
    let mut report = serde_json::json!({
        "loss_type": args.objective.loss_type,
        "beta": args.objective.beta,
        "loss": list(&loss)?[0],
        "logp_w": lw,
        "logp_l": ll,
        "n_w": nw,
        "n_l": nl,
        "ranking_accuracy": metrics::ranking_accuracy(&lw, &ll)?,
        "normalized_ranking_accuracy": metrics::normalized_ranking_accuracy(&lw, &nw, &ll, &nl)?,
    });
    if let Some((rw, rl)) = &scores.reference {
        let (rw, rl) = (list(rw)?, list(rl)?);
        let rho_w: Vec<f64> = lw.iter().zip(&rw).map(|(a, b)| a - b).collect();
        let rho_l: Vec<f64> = ll.iter().zip(&rl).map(|(a, b)| a - b).collect();
        report["ref_logp_w"] = rw.into();
        report["ref_logp_l"] = rl.into();
        report["reward_accuracy"] = metrics::reward_accuracy(&rho_w, &rho_l)?.into();
        let margin: f64 = rho_w.iter().zip(&rho_l).map(|(w, l)| w - l).sum::<f64>() / rho_w.len() as f64;
        report["reward_margin"] = (args.objective.beta * margin).into();
    }
    if let Some(path) = &args.grads_out {
        let grads = loss.backward()?;
        let mut tensors = HashMap::new();
        for (name, var) in vb.vars() {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            tensors.insert(name, g);
        }
        save_safetensors(path, &tensors, None)?;
    }
    println!("{report}");
    Ok(())
}

fn reward(args: RewardArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let batch = PairBatch::from_file(&args.batch, &device)?;
    batch.check_positions(lm_config(&args.model)?.max_positions(), &args.batch)?;
    let opts = LoadOptions {
        device,
        ..Default::default()
    };
    let (rm, _) = RewardModel::from_pretrained(&args.model, &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let report = match (rm.forward(&batch.chosen)?, rm.forward(&batch.rejected)?) {
        (RewardOutput::Rewards(w), RewardOutput::Rewards(l)) => {
            serde_json::json!({"reward_w": list(&w)?, "reward_l": list(&l)?})
        }
        (RewardOutput::Embeddings { v: vw, gate }, RewardOutput::Embeddings { v: vl, .. }) => {
            let s = gpm_score(&vw, &vl, gate.as_ref())?;
            let rows = |t: &Tensor| -> anyhow::Result<Vec<Vec<f64>>> { Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?) };
            let mut r = serde_json::json!({
                "embedding_w": rows(&vw)?,
                "embedding_l": rows(&vl)?,
                "score": list(&s)?,
            });
            if let Some(g) = &gate {
                r["gate"] = rows(g)?.into();
            }
            r
        }
        _ => unreachable!("one model gives one kind of output"),
    };
    println!("{report}");
    Ok(())
}

/// A progress bar and a JSONL line on stdout per step.
fn step_printer(label: &str, steps: usize) -> (indicatif::ProgressBar, impl FnMut(&LmStepRecord)) {
    let bar = super::progress_bar(label, steps as u64);
    let b = bar.clone();
    (bar, move |r: &LmStepRecord| {
        b.set_message(format!("loss {:.4} acc {:.2}", r.loss, r.accuracy));
        b.inc(1);
        b.suspend(|| println!("{}", serde_json::to_string(r).expect("plain record")));
    })
}

/// The config of the LM in `dir`, read before anything else so that a folder of another kind of
/// model fails first, naming its config.
fn lm_config(dir: &Path) -> anyhow::Result<LlamaConfig> {
    Ok(LlamaConfig::from_file(&dir.join("config.json"))?)
}

/// Loads the pairs of `data` tokenised for the LM in `dir` ([`load_pairs`]), refusing a sequence
/// longer than the model's positions.
fn pairs_for(data: &Path, dir: &Path, cfg: &LlamaConfig) -> anyhow::Result<Vec<diffalign::lm::data::TokenPair>> {
    let pairs = load_pairs(data, dir, cfg.eos_id())?;
    check_positions(pair_seqs(&pairs), cfg.max_positions(), data)?;
    Ok(pairs)
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let s = args.optim.settings()?;
    let cfg = lm_config(&args.policy)?;
    let kto = args.objective.loss_type == "kto";
    let (pairs, examples, objective) = if kto {
        let examples = load_examples(&args.optim.data, &args.policy, cfg.eos_id())?;
        let seqs = examples.iter().enumerate().map(|(i, e)| (i, &e.seq));
        check_positions(seqs, cfg.max_positions(), &args.optim.data)?;
        (Vec::new(), examples, None)
    } else {
        let pairs = pairs_for(&args.optim.data, &args.policy, &cfg)?;
        (pairs, Vec::new(), Some(args.objective.objective()?))
    };
    let held_out = args
        .optim
        .eval_data
        .as_deref()
        .map(|p| pairs_for(p, &args.policy, &cfg))
        .transpose()?;
    let evaluate = |dir: &Path| -> anyhow::Result<Option<lm_train::PolicyMetrics>> {
        let Some(pairs) = &held_out else { return Ok(None) };
        let (policy, _) = load_lm(dir, &s.device, false)?;
        let (reference, _) = load_lm(&args.policy, &s.device, false)?;
        Ok(Some(lm_train::evaluate_policy(
            &policy,
            &reference,
            pairs,
            s.batch_size,
        )?))
    };
    let before = evaluate(&args.policy)?;
    let (bar, mut on_step) = step_printer("lm train", s.steps);
    let lora = args.lora_rank.map(|rank| LoraConfig {
        rank,
        alpha: args.lora_alpha.unwrap_or(rank as f64),
        target_modules: args.lora_targets.split(',').map(|t| t.trim().to_string()).collect(),
        init_seed: args.optim.seed,
    });
    if lora.as_ref().is_some_and(|l| l.rank == 0) {
        bail!("--lora-rank: must be at least 1");
    }
    let data = match objective {
        Some(objective) => PolicyData::Pairs {
            pairs: &pairs,
            objective,
        },
        None => PolicyData::Unpaired {
            examples: &examples,
            kto: Kto {
                beta: args.objective.beta,
                desirable_weight: args.desirable_weight,
                undesirable_weight: args.undesirable_weight,
            },
        },
    };
    let n = pairs.len().max(examples.len());
    lm_train::train_policy(&args.policy, data, &s, lora.as_ref(), &args.optim.out, &mut on_step)?;
    bar.finish();
    let after = evaluate(&args.optim.out)?;
    println!(
        "{}",
        serde_json::json!({"out": args.optim.out, "examples": n, "eval_before": before, "eval_after": after})
    );
    Ok(())
}

fn train_rm(args: TrainRmArgs) -> anyhow::Result<()> {
    let kind: HeadKind = args.head.parse()?;
    let s = args.optim.settings()?;
    let head = HeadSettings {
        kind,
        gpm_dim: args.value_head_dim,
        gate: args.prompt_gate,
        tau: args.tau.unwrap_or(match kind {
            HeadKind::Bt => 1.0,
            HeadKind::Gpm => 0.1,
        }),
        seed: args.optim.seed,
    };
    let cfg = lm_config(&args.model)?;
    let pairs = pairs_for(&args.optim.data, &args.model, &cfg)?;
    let (bar, mut on_step) = step_printer("lm train-rm", s.steps);
    lm_train::train_reward_model(&args.model, &pairs, &head, &s, &args.optim.out, &mut on_step)?;
    bar.finish();
    let eval = match &args.optim.eval_data {
        Some(p) => {
            let held = pairs_for(p, &args.model, &cfg)?;
            Some(lm_train::evaluate_reward_model(
                &args.optim.out,
                &held,
                s.batch_size,
                &s.device,
            )?)
        }
        None => None,
    };
    println!(
        "{}",
        serde_json::json!({"out": args.optim.out, "pairs": pairs.len(), "eval": eval})
    );
    Ok(())
}

fn eval_rm(args: EvalRmArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let pairs = pairs_for(&args.data, &args.model, &lm_config(&args.model)?)?;
    let report = lm_train::evaluate_reward_model(&args.model, &pairs, args.batch_size, &device)?;
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        diffalign::weights::store::write_atomic(out, text.clone() + "\n")?;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

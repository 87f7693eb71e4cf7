//! Training and evaluation on language-model preference pairs: DPO-family fine-tuning of a
//! causal LM against its frozen starting point, and Bradley-Terry / GPM reward models. One loop
//! serves both: shuffled batches from a seeded RNG, AdamW with f32 master weights, global
//! gradient-norm clipping, one JSON record per step.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::batch::{PairBatch, Sequences};
use super::data::{TokenExample, TokenPair};
use super::reward_model::{HeadKind, RewardModel};
use super::{completion_logps, rewardbench};
use crate::models::llama::{LlamaConfig, LlamaForCausalLM};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::preference::heads::{bt_loss, gpm_loss};
use crate::preference::kto::Kto;
use crate::preference::{metrics, Objective, PairScores};
use crate::rng::Rng;
use crate::weights::lora::{LoraConfig, LoraSource};
use crate::weights::store::write_atomic;
use crate::weights::{save_safetensors, LoadOptions, VarBuilder};
use crate::{Error, Result};

/// Optimisation settings shared by both trainers.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// Where the models run.
    pub device: Device,
    /// Optimizer steps.
    pub steps: usize,
    /// Pairs per step.
    pub batch_size: usize,
    /// Learning rate (constant).
    pub lr: f64,
    /// Seed of the batch order.
    pub seed: u64,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// AdamW settings.
    pub adamw: AdamWConfig,
}

impl TrainSettings {
    fn validate(&self, n_pairs: usize) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(Error::input("steps / batch size", "must be positive"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::input("lr", format!("must be positive, got {}", self.lr)));
        }
        if n_pairs == 0 {
            return Err(Error::input("data", "no training pairs"));
        }
        Ok(())
    }
}

/// One step's record (a JSONL line).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepRecord {
    /// 1-based step.
    pub step: usize,
    /// The loss.
    pub loss: f64,
    /// Pairs ranked right in the batch: by implicit reward for a policy, by reward for a reward model.
    pub accuracy: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The pad id of a config (its `pad_token_id`, else 0: padding is masked anyway).
pub fn pad_id(cfg: &LlamaConfig) -> u32 {
    cfg.pad_token_id.and_then(|p| u32::try_from(p).ok()).unwrap_or(0)
}

/// Runs `steps` AdamW steps of `loss_fn` (loss and batch accuracy) over shuffled batches of `items`.
fn train_loop<T>(
    vars: Vec<(String, Var)>,
    items: &[T],
    s: &TrainSettings,
    mut loss_fn: impl FnMut(&[&T]) -> Result<(Tensor, f64)>,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<Vec<StepRecord>> {
    s.validate(items.len())?;
    let tensors: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let mut opt = AdamW::new(vars, s.adamw)?;
    let mut rng = Rng::new(s.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut records = Vec::with_capacity(s.steps);
    for step in 1..=s.steps {
        let mut picked = Vec::with_capacity(s.batch_size);
        while picked.len() < s.batch_size.min(items.len()) {
            if order.is_empty() {
                order = (0..items.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            picked.push(&items[order.pop().expect("refilled")]);
        }
        let (loss, accuracy) = loss_fn(&picked)?;
        let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_v.is_finite() {
            return Err(Error::input("training", format!("the loss is {loss_v} at step {step}")));
        }
        let grads = loss.backward()?;
        let mut g: Vec<Tensor> = tensors
            .iter()
            .map(|t| grads.get(t).cloned().map_or_else(|| t.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = clip_grad_norm(&mut g, s.max_grad_norm)?;
        opt.update(&g, s.lr)?;
        let r = StepRecord {
            step,
            loss: loss_v,
            accuracy,
            grad_norm,
        };
        on_step(&r);
        records.push(r);
    }
    Ok(records)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The preference loss of `batch` for `policy` against `reference` (needed unless the loss is
/// reference-free), with the batch's reward accuracy.
pub fn policy_loss(
    policy: &LlamaForCausalLM,
    reference: Option<&LlamaForCausalLM>,
    objective: &Objective,
    batch: &PairBatch,
) -> Result<(Tensor, f64, PairScores)> {
    let (lw, nw) = completion_logps(policy, &batch.chosen)?;
    let (ll, nl) = completion_logps(policy, &batch.rejected)?;
    let reference = match (objective.needs_reference(), reference) {
        (true, Some(r)) => {
            let (rw, _) = completion_logps(r, &batch.chosen)?;
            let (rl, _) = completion_logps(r, &batch.rejected)?;
            Some((rw.detach(), rl.detach()))
        }
        (true, None) => return Err(Error::input("--reference", "this loss needs a reference model")),
        (false, _) => None,
    };
    let scores = PairScores {
        policy_w: lw,
        policy_l: ll,
        reference,
        weights: None,
        lengths: Some((nw, nl)),
    };
    let out = objective.evaluate(&scores)?;
    let acc = out.metrics.implicit_acc.unwrap_or(0.0);
    Ok((out.loss, acc, scores))
}

/// DPO-family fine-tuning of the causal LM in `policy_dir` against its frozen starting point:
/// every weight, or with `lora` only fresh LoRA adapters on the target linear layers. Writes
/// `out/` (config, the whole merged weights, `metrics.jsonl`, and for a LoRA PEFT's
/// `adapter_model.safetensors` + `adapter_config.json`) and returns the records.
pub fn train_policy(
    policy_dir: &Path,
    data: PolicyData,
    s: &TrainSettings,
    lora: Option<&LoraConfig>,
    out: &Path,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<Vec<StepRecord>> {
    let needs_reference = match &data {
        PolicyData::Pairs { objective, .. } => {
            objective.validate()?;
            objective.needs_reference()
        }
        PolicyData::Unpaired { .. } => true,
    };
    let frozen = LoadOptions {
        device: s.device.clone(),
        ..Default::default()
    };
    let (policy, vb) = match lora {
        Some(cfg) => {
            let vb = frozen
                .open(policy_dir, "model")?
                .with_lora(Arc::new(LoraSource::fresh_for(cfg, PEFT_LM_PREFIX)));
            let cfg_file = LlamaConfig::from_file(&policy_dir.join("config.json"))?;
            let m = LlamaForCausalLM::new(&cfg_file, vb.clone())?;
            vb.check_lora_attached()?;
            (m, vb)
        }
        None => LlamaForCausalLM::from_pretrained(
            policy_dir,
            &LoadOptions {
                trainable: true,
                ..frozen.clone()
            },
        )?,
    };
    let reference = if needs_reference {
        Some(LlamaForCausalLM::from_pretrained(policy_dir, &frozen)?.0)
    } else {
        None
    };
    let vars = if lora.is_some() { vb.lora_vars() } else { vb.vars() };
    let pad = pad_id(policy.model().config());
    let records = match data {
        PolicyData::Pairs { pairs, objective } => train_loop(
            vars,
            pairs,
            s,
            |picked| {
                let batch = PairBatch::from_pairs(picked, pad, &s.device)?;
                let (loss, acc, _) = policy_loss(&policy, reference.as_ref(), &objective, &batch)?;
                Ok((loss, acc))
            },
            on_step,
        )?,
        PolicyData::Unpaired { examples, kto } => {
            if s.batch_size < 2 || examples.len() < 2 {
                return Err(Error::input(
                    "kto",
                    "needs at least 2 examples per batch (its KL completions come from the batch's other rows)",
                ));
            }
            let reference = reference.as_ref().expect("KTO loads its reference");
            train_loop(
                vars,
                examples,
                s,
                |picked| kto_loss(&policy, reference, &kto, picked, pad, &s.device),
                on_step,
            )?
        }
    };
    match lora {
        Some(cfg) => save_lora_policy(policy_dir, &vb, cfg, out, &records)?,
        None => save_model(policy_dir, &vb, None, out, &records)?,
    }
    Ok(records)
}

/// What a policy trains on.
pub enum PolicyData<'a> {
    /// Preference pairs under a DPO-family objective.
    Pairs {
        /// The pairs.
        pairs: &'a [TokenPair],
        /// The objective.
        objective: Objective,
    },
    /// Unpaired desirable / undesirable examples under KTO.
    Unpaired {
        /// The examples.
        examples: &'a [TokenExample],
        /// KTO's settings.
        kto: Kto,
    },
}

/// KTO's loss on a batch of examples, with the KL completions made by rotating the completions
/// by one within the batch (TRL's mismatched pairs), and the fraction of examples whose
/// log-ratio has the label's sign.
fn kto_loss(
    policy: &LlamaForCausalLM,
    reference: &LlamaForCausalLM,
    kto: &Kto,
    picked: &[&TokenExample],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, f64)> {
    let n = picked.len();
    let rows: Vec<(Vec<u32>, usize)> = picked
        .iter()
        .map(|e| (e.seq.tokens.clone(), e.seq.completion_start))
        .collect();
    let kl_rows: Vec<(Vec<u32>, usize)> = (0..n)
        .map(|i| {
            let own = &picked[i].seq;
            let other = &picked[(i + 1) % n].seq;
            let mut t = own.tokens[..own.completion_start].to_vec();
            t.extend_from_slice(&other.tokens[other.completion_start..]);
            (t, own.completion_start)
        })
        .collect();
    let seq = Sequences::from_rows(&rows, pad, device)?;
    let kl = Sequences::from_rows(&kl_rows, pad, device)?;
    let (logp, _) = completion_logps(policy, &seq)?;
    let (ref_logp, _) = completion_logps(reference, &seq)?;
    let (kl_logp, _) = completion_logps(policy, &kl)?;
    let (kl_ref, _) = completion_logps(reference, &kl)?;
    let desirable: Vec<bool> = picked.iter().map(|e| e.desirable).collect();
    let loss = kto.loss(
        &logp,
        &ref_logp.detach(),
        &desirable,
        &kl_logp.detach(),
        &kl_ref.detach(),
    )?;
    let rho = to_vec(&(logp.detach() - ref_logp)?)?;
    let right = rho
        .iter()
        .zip(&desirable)
        .filter(|(r, d)| (**r > 0.0) == **d && **r != 0.0)
        .count();
    Ok((loss, right as f64 / n as f64))
}

/// PEFT's key prefix for a causal LM's adapters (`base_model.model.<module>.lora_A.weight`).
pub const PEFT_LM_PREFIX: &str = "base_model.model";

/// Writes a LoRA policy: the PEFT adapter and config, and the base weights with the adapters
/// merged (so that every command loads `out/` as a plain model).
fn save_lora_policy(
    base_dir: &Path,
    vb: &VarBuilder,
    cfg: &LoraConfig,
    out: &Path,
    records: &[StepRecord],
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let adapters: HashMap<String, Tensor> = vb
        .lora_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    save_safetensors(&out.join("adapter_model.safetensors"), &adapters, None)?;
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": cfg.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base_dir.display().to_string(),
    });
    write_atomic(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&adapter_config).expect("plain JSON") + "\n",
    )?;
    let store = crate::weights::layout::open_weights(base_dir, "model", None)?;
    let merged_by_module: HashMap<String, crate::nn::LoraAdapter> = vb.lora_adapters().into_iter().collect();
    let mut tensors = HashMap::new();
    for name in store.names() {
        let w = store.get(&name, None, DType::F32, &Device::Cpu)?;
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        let w = match merged_by_module.get(module) {
            Some(a) => a.fuse(&w.to_device(a.a.device())?)?.to_device(&Device::Cpu)?,
            None => w,
        };
        tensors.insert(name, w);
    }
    save_safetensors(&out.join("model.safetensors"), &tensors, None)?;
    copy_model_files(base_dir, out, records)
}

/// Log-probability metrics of a policy on pairs: reward accuracy against the reference, ranking
/// accuracy (raw and length-normalised).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PolicyMetrics {
    /// Fraction with `rho_w > rho_l`.
    pub reward_accuracy: f64,
    /// Fraction with `logp_w >= logp_l`.
    pub ranking_accuracy: f64,
    /// The same on per-token means.
    pub normalized_ranking_accuracy: f64,
    /// Number of pairs.
    pub n: usize,
}

/// Evaluates `policy` (against `reference`) on `pairs`, in batches of `batch_size`.
pub fn evaluate_policy(
    policy: &LlamaForCausalLM,
    reference: &LlamaForCausalLM,
    pairs: &[TokenPair],
    batch_size: usize,
) -> Result<PolicyMetrics> {
    let pad = pad_id(policy.model().config());
    let device = policy.model().embed_tokens().device().clone();
    let (mut lw, mut ll, mut rw, mut rl, mut nw, mut nl) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenPair> = chunk.iter().collect();
        let b = PairBatch::from_pairs(&refs, pad, &device)?;
        for (model, side, logp, n) in [
            (policy, &b.chosen, &mut lw, Some(&mut nw)),
            (policy, &b.rejected, &mut ll, Some(&mut nl)),
            (reference, &b.chosen, &mut rw, None),
            (reference, &b.rejected, &mut rl, None),
        ] {
            let (lp, len) = completion_logps(model, side)?;
            logp.extend(to_vec(&lp.detach())?);
            if let Some(n) = n {
                n.extend(to_vec(&len)?);
            }
        }
    }
    let rho_w: Vec<f64> = lw.iter().zip(&rw).map(|(a, b)| a - b).collect();
    let rho_l: Vec<f64> = ll.iter().zip(&rl).map(|(a, b)| a - b).collect();
    Ok(PolicyMetrics {
        reward_accuracy: metrics::reward_accuracy(&rho_w, &rho_l)?,
        ranking_accuracy: metrics::ranking_accuracy(&lw, &ll)?,
        normalized_ranking_accuracy: metrics::normalized_ranking_accuracy(&lw, &nw, &ll, &nl)?,
        n: pairs.len(),
    })
}

/// Reward-model settings: the head and GPM's dimension, gate and temperature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSettings {
    /// `bt` or `gpm`.
    pub kind: HeadKind,
    /// GPM embedding width 2k.
    pub gpm_dim: usize,
    /// GPM prompt gate.
    pub gate: bool,
    /// Temperature of the pairwise logit (GPM's tau, 0.1; 1 for BT).
    pub tau: f64,
    /// Seed of the new head's initialisation.
    pub seed: u64,
}

/// Trains a reward model on `pairs` from the backbone in `base_dir` (a causal LM or a reward
/// model); every weight trains. Writes `out/` and returns the records.
pub fn train_reward_model(
    base_dir: &Path,
    pairs: &[TokenPair],
    head: &HeadSettings,
    s: &TrainSettings,
    out: &Path,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<Vec<StepRecord>> {
    let mut cfg = LlamaConfig::from_file(&base_dir.join("config.json"))?;
    if head.kind == HeadKind::Gpm {
        cfg.other.insert("value_head_dim".into(), head.gpm_dim.into());
        cfg.other.insert("add_prompt_head".into(), head.gate.into());
        cfg.other.insert("general_preference_tau".into(), head.tau.into());
    }
    let opts = LoadOptions {
        trainable: true,
        device: s.device.clone(),
        ..Default::default()
    };
    let vb = opts.open(base_dir, "model")?;
    let fresh = VarBuilder::random(head.seed, DType::F32, &s.device, true);
    let rm = RewardModel::new(&cfg, vb.clone(), Some(head.kind), Some(fresh.clone()))?;
    let tau = match head.kind {
        HeadKind::Bt => head.tau,
        HeadKind::Gpm => 1.0, // pair_logits already divides by the head's tau
    };
    let mut vars: Vec<(String, Var)> = vb.vars().into_iter().filter(|(n, _)| n.starts_with("model.")).collect();
    vars.extend(fresh.vars());
    let pad = pad_id(&cfg);
    let records = train_loop(
        vars,
        pairs,
        s,
        |picked| {
            let batch = PairBatch::from_pairs(picked, pad, &s.device)?;
            let logits = rm.pair_logits(&batch.chosen, &batch.rejected)?;
            let zero = logits.zeros_like()?;
            let loss = match head.kind {
                HeadKind::Bt => bt_loss(&logits, &zero, tau)?,
                HeadKind::Gpm => gpm_loss(&logits, 1.0)?,
            };
            let acc = scalar(&logits.gt(0f64)?.to_dtype(DType::F32)?)?;
            Ok((loss, acc))
        },
        on_step,
    )?;
    save_model(base_dir, &vb, Some((&fresh, head, &cfg)), out, &records)?;
    Ok(records)
}

/// Writes `out/config.json`, `out/model.safetensors` (the backbone's `model.*` weights, the
/// head's, or the whole policy) and `out/metrics.jsonl`, each atomically; copies the tokenizer.
fn save_model(
    base_dir: &Path,
    vb: &VarBuilder,
    head: Option<(&VarBuilder, &HeadSettings, &LlamaConfig)>,
    out: &Path,
    records: &[StepRecord],
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let keep_all = head.is_none();
    for (name, var) in vb.vars() {
        if keep_all || name.starts_with("model.") {
            tensors.insert(name, var.as_tensor().detach());
        }
    }
    let mut config: serde_json::Value = crate::json::read_json(&base_dir.join("config.json"), "config file")?;
    if let Some((fresh, settings, cfg)) = head {
        for (name, var) in fresh.vars() {
            tensors.insert(name, var.as_tensor().detach());
        }
        let family = match cfg.model_type.as_str() {
            "qwen2" => "Qwen2",
            "mistral" => "Mistral",
            _ => "Llama",
        };
        let obj = config
            .as_object_mut()
            .ok_or_else(|| Error::config(base_dir, "(json)", "not an object"))?;
        obj.remove("tie_word_embeddings");
        match settings.kind {
            HeadKind::Bt => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!([format!("{family}ForSequenceClassification")]),
                );
                obj.insert("num_labels".into(), 1.into());
                obj.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
                obj.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            }
            HeadKind::Gpm => {
                obj.insert(
                    "architectures".into(),
                    serde_json::json!([format!("{family}ForGeneralPreference")]),
                );
                obj.insert("value_head_dim".into(), settings.gpm_dim.into());
                obj.insert("add_prompt_head".into(), settings.gate.into());
                obj.insert("general_preference_tau".into(), settings.tau.into());
            }
        }
        if obj.get("pad_token_id").is_none_or(|v| v.is_null()) {
            obj.insert("pad_token_id".into(), 0.into());
        }
    }
    save_safetensors(&out.join("model.safetensors"), &tensors, None)?;
    let pretty = serde_json::to_string_pretty(&config).map_err(|e| Error::input("config", e.to_string()))?;
    write_atomic(&out.join("config.json"), pretty + "\n")?;
    copy_model_files(base_dir, out, records)
}

/// Writes `metrics.jsonl` and copies the tokenizer and generation files (and, when `out` has
/// no config yet, the config) from `base_dir`.
fn copy_model_files(base_dir: &Path, out: &Path, records: &[StepRecord]) -> Result<()> {
    let lines: String = records
        .iter()
        .map(|r| serde_json::to_string(r).expect("plain record") + "\n")
        .collect();
    write_atomic(&out.join("metrics.jsonl"), lines)?;
    if std::fs::canonicalize(base_dir).ok() == std::fs::canonicalize(out).ok() {
        return Ok(());
    }
    for extra in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let from = base_dir.join(extra);
        let keep = extra == "config.json" && out.join(extra).is_file();
        if from.is_file() && !keep {
            crate::weights::copy::copy_file(&from, &out.join(extra))?;
        }
    }
    Ok(())
}

/// Whether a reward model ranks each pair right (chosen strictly above rejected), in batches.
pub fn reward_model_outcomes(rm: &RewardModel, pad: u32, pairs: &[TokenPair], batch_size: usize) -> Result<Vec<bool>> {
    let device = rm.model.embed_tokens().device().clone();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenPair> = chunk.iter().collect();
        let b = PairBatch::from_pairs(&refs, pad, &device)?;
        let logits = rm.pair_logits(&b.chosen, &b.rejected)?;
        out.extend(to_vec(&logits.detach())?.into_iter().map(|x| x > 0.0));
    }
    Ok(out)
}

/// RewardBench report of the reward model in `dir` on `pairs`.
pub fn evaluate_reward_model(
    dir: &Path,
    pairs: &[TokenPair],
    batch_size: usize,
    device: &Device,
) -> Result<rewardbench::Report> {
    let opts = LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let (rm, _) = RewardModel::from_pretrained(dir, &opts)?;
    let pad = pad_id(rm.model.config());
    let ok = reward_model_outcomes(&rm, pad, pairs, batch_size)?;
    let outcomes: Vec<(Option<String>, bool)> = pairs.iter().zip(ok).map(|(p, o)| (p.subset.clone(), o)).collect();
    Ok(rewardbench::report(&outcomes))
}

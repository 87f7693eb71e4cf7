//! DPO-family and KTO fine-tuning of a causal LM, and its evaluation on pairs.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use serde::Serialize;

use super::save::{save_lora_policy, save_model, PEFT_LM_PREFIX};
use super::{pad_id, to_vec, train_loop, LmStepRecord, TrainSettings};
use crate::lm::batch::PairBatch;
use crate::lm::completion_logps;
use crate::lm::data::{TokenExample, TokenPair};
use crate::lm::kto::kto_loss;
use crate::models::llama::{LlamaConfig, LlamaForCausalLM};
use crate::preference::kto::Kto;
use crate::preference::{metrics, Objective, PairScores};
use crate::weights::lora::{LoraConfig, LoraSource};
use crate::weights::LoadOptions;
use crate::{Error, Result};

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
    on_step: &mut dyn FnMut(&LmStepRecord),
) -> Result<Vec<LmStepRecord>> {
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

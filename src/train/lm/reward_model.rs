//! Training and evaluating Bradley-Terry and GPM reward models on LM preference pairs.

use std::path::Path;

use candle_core::{DType, Device, Var};

use super::save::save_model;
use super::{pad_id, scalar, to_vec, train_loop, LmStepRecord, TrainSettings};
use crate::lm::batch::PairBatch;
use crate::lm::data::TokenPair;
use crate::lm::reward_model::{HeadKind, RewardModel};
use crate::lm::rewardbench;
use crate::models::llama::LlamaConfig;
use crate::preference::heads::{bt_loss, gpm_loss};
use crate::weights::{LoadOptions, VarBuilder};
use crate::Result;

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
    on_step: &mut dyn FnMut(&LmStepRecord),
) -> Result<Vec<LmStepRecord>> {
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

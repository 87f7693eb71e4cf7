//! Language-model reward models: a [`LlamaModel`] backbone with a Bradley-Terry head
//! (`score.weight`, a transformers `*ForSequenceClassification` checkpoint) or a General
//! Preference Model head (`value_head.weight`, optional `prompt_head.weight`; config keys
//! `value_head_dim`, `add_prompt_head`, `general_preference_tau` as the GPM repository names them).

use std::path::Path;

use candle_core::Tensor;

use super::batch::Sequences;
use crate::models::llama::{gather_positions, last_positions, LlamaConfig, LlamaModel};
use crate::nn::Linear;
use crate::preference::heads::GpmHead;
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

/// Which head a reward model has.
#[derive(Debug, Clone)]
pub enum Head {
    /// Bradley-Terry: a scalar reward per response.
    Bt(Linear),
    /// General Preference Model: a unit embedding per response, scored pairwise.
    Gpm(GpmHead),
}

/// The head kind as the CLI spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// `bt`.
    Bt,
    /// `gpm`.
    Gpm,
}

impl std::str::FromStr for HeadKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        crate::error::one_of("--head", s, &[("bt", HeadKind::Bt), ("gpm", HeadKind::Gpm)])
    }
}

/// What a reward model gives for a batch of responses.
#[derive(Debug, Clone)]
pub enum RewardOutput {
    /// Bradley-Terry rewards `[B]`.
    Rewards(Tensor),
    /// GPM unit embeddings `[B, 2k]` and gate weights `[B, k]` (with a prompt head).
    Embeddings {
        /// Unit embeddings.
        v: Tensor,
        /// Gate weights from the prompt's last token.
        gate: Option<Tensor>,
    },
}

/// A backbone and a reward head.
#[derive(Debug, Clone)]
pub struct RewardModel {
    /// The backbone.
    pub model: LlamaModel,
    /// The head.
    pub head: Head,
}

impl RewardModel {
    /// Builds from `vb` with the head the checkpoint has (`score.weight` or `value_head.weight`),
    /// or, when it has neither and `fresh` is given, a new head of `kind` from `fresh` (GPM
    /// settings from the config's `value_head_dim`, `add_prompt_head`, `general_preference_tau`).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder, kind: Option<HeadKind>, fresh: Option<VarBuilder>) -> Result<Self> {
        let model = LlamaModel::new(cfg, vb.pp("model"))?;
        let has_bt = vb.contains("score.weight");
        let has_gpm = vb.contains("value_head.weight");
        let (kind, vb) = match (has_bt, has_gpm, kind) {
            (true, _, None | Some(HeadKind::Bt)) => (HeadKind::Bt, vb),
            (_, true, None | Some(HeadKind::Gpm)) => (HeadKind::Gpm, vb),
            (false, false, Some(k)) if fresh.is_some() => (k, fresh.expect("checked")),
            (false, false, _) => {
                return Err(Error::input(
                    cfg.source.display().to_string(),
                    "the checkpoint has no reward head (score.weight or value_head.weight)",
                ))
            }
            (_, _, Some(k)) => {
                return Err(Error::input(
                    cfg.source.display().to_string(),
                    format!("the checkpoint's head is not the requested {k:?} head"),
                ))
            }
        };
        let head = match kind {
            HeadKind::Bt => {
                let labels = cfg.num_labels();
                if labels != 1 {
                    return Err(Error::config(
                        &cfg.source,
                        "num_labels",
                        format!("a reward model has 1 label, got {labels}"),
                    ));
                }
                Head::Bt(Linear::new(cfg.hidden_size, 1, false, vb.pp("score"))?)
            }
            HeadKind::Gpm => {
                let dim = cfg.other.get("value_head_dim").and_then(|v| v.as_u64()).unwrap_or(6) as usize;
                let gate = cfg
                    .other
                    .get("add_prompt_head")
                    .and_then(|v| v.as_bool())
                    .unwrap_or_else(|| vb.contains("prompt_head.weight"));
                let tau = cfg
                    .other
                    .get("general_preference_tau")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.1);
                Head::Gpm(GpmHead::new(cfg.hidden_size, dim, gate, tau, vb.clone())?)
            }
        };
        Ok(RewardModel { model, head })
    }

    /// Loads a folder (config and weights); the builder is returned for training.
    pub fn from_pretrained(dir: &Path, opts: &LoadOptions) -> Result<(Self, VarBuilder)> {
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let vb = opts.open(dir, "model")?;
        let m = Self::new(&cfg, vb.clone(), None, None)?;
        crate::weights::check_all_used(&vb, |n| n.ends_with("rotary_emb.inv_freq") || n == "lm_head.weight")?;
        Ok((m, vb))
    }

    /// The head's kind.
    pub fn kind(&self) -> HeadKind {
        match self.head {
            Head::Bt(_) => HeadKind::Bt,
            Head::Gpm(_) => HeadKind::Gpm,
        }
    }

    /// Rewards or embeddings for a batch of prompt+response sequences (the head reads the last
    /// attended token; the GPM gate reads the prompt's last token).
    pub fn forward(&self, seq: &Sequences) -> Result<RewardOutput> {
        let h = self.model.forward(&seq.input_ids, Some(&seq.attention_mask))?;
        let last = gather_positions(&h, &last_positions(&seq.attention_mask)?)?;
        match &self.head {
            Head::Bt(score) => Ok(RewardOutput::Rewards(score.forward(&last)?.squeeze(1)?)),
            Head::Gpm(g) => {
                let gate = if g.has_gate() {
                    g.gate(&gather_positions(&h, &seq.last_prompt_positions()?)?)?
                } else {
                    None
                };
                Ok(RewardOutput::Embeddings {
                    v: g.embed(&last)?,
                    gate,
                })
            }
        }
    }

    /// The pairwise preference logit of each pair (chosen over rejected): `r_w - r_l` for BT,
    /// `s(w > l) / tau` for GPM (the gate from the chosen side's prompt, which both share).
    pub fn pair_logits(&self, chosen: &Sequences, rejected: &Sequences) -> Result<Tensor> {
        let w = self.forward(chosen)?;
        let l = self.forward(rejected)?;
        match (w, l, &self.head) {
            (RewardOutput::Rewards(rw), RewardOutput::Rewards(rl), _) => Ok((rw - rl)?),
            (RewardOutput::Embeddings { v: vw, gate }, RewardOutput::Embeddings { v: vl, .. }, Head::Gpm(g)) => {
                Ok((crate::preference::heads::gpm_score(&vw, &vl, gate.as_ref())? / g.tau)?)
            }
            _ => unreachable!("one head gives one kind of output"),
        }
    }
}

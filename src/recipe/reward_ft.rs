//! The reward fine-tuning part of a recipe: `method = "draft" | "alignprop" | "refl"` in
//! `[train]`, their settings in `[reward_ft]` and the rewards in `[[reward]]` tables (the same
//! `KIND` and folder as `reno --reward KIND=PATH:WEIGHT`).
//!
//! ```toml
//! [train]
//! method = "draft"
//!
//! [reward_ft]
//! sample_steps = 50   # DDIM steps of every sampled image (eta 0)
//! guidance = 7.5      # classifier-free guidance while sampling
//! draft_k = 1         # draft: gradients through the last K steps
//! draft_lv = 0        # draft: DRaFT-LV's noised copies of the last step (needs draft_k = 1)
//! # alignprop_k = 50  # alignprop: K drawn uniformly from [1, alignprop_k] per sample
//! # refl_t_lo = 0     # refl: the timestep range [t_lo, t_hi] of the one-step prediction
//! # refl_t_hi = 250
//! # refl_pretrain_weight = 1.0
//!
//! [[reward]]
//! kind = "pickscore"
//! path = "models/PickScore_v1"
//! weight = 1.0        # default: ReNO's weight for the kind (RewardKind::reno_loss)
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::reward::{RewardKind, RewardSpec};
use crate::{Error, Result};

/// The reward fine-tuning methods' names in `train.method`.
pub const REWARD_METHODS: [&str; 3] = ["draft", "alignprop", "refl"];

/// `[reward_ft]`: how images are sampled and where gradients flow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardFtSection {
    /// DDIM steps (eta 0) of every sampled image (DRaFT and AlignProp: 50).
    #[serde(default = "default_sample_steps")]
    pub sample_steps: usize,
    /// Classifier-free guidance while sampling (7.5 in both papers; <= 1 turns it off).
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// DRaFT-K: the final sampler steps gradients flow through (default 1).
    #[serde(default = "one")]
    pub draft_k: usize,
    /// DRaFT-LV: noised copies of the last step whose gradients are averaged (0: plain DRaFT-K).
    #[serde(default)]
    pub draft_lv: usize,
    /// AlignProp: the most final steps gradients flow through; each sample draws its number
    /// uniformly from `[1, alignprop_k]` (default: every step).
    #[serde(default)]
    pub alignprop_k: Option<usize>,
    /// ReFL: lowest timestep of the one-step x0 prediction.
    #[serde(default)]
    pub refl_t_lo: usize,
    /// ReFL: highest timestep of the one-step x0 prediction (the official 40-step loop stops at
    /// a step drawn from 30..=39, timesteps 1 to 226).
    #[serde(default = "default_refl_t_hi")]
    pub refl_t_hi: usize,
    /// ReFL: weight of the denoising (pre-training) loss on a data batch, when the data has
    /// images.
    #[serde(default = "default_pretrain_weight")]
    pub refl_pretrain_weight: f64,
}

impl Default for RewardFtSection {
    fn default() -> Self {
        RewardFtSection {
            sample_steps: default_sample_steps(),
            guidance: default_guidance(),
            draft_k: 1,
            draft_lv: 0,
            alignprop_k: None,
            refl_t_lo: 0,
            refl_t_hi: default_refl_t_hi(),
            refl_pretrain_weight: default_pretrain_weight(),
        }
    }
}

fn default_sample_steps() -> usize {
    50
}
fn default_guidance() -> f64 {
    7.5
}
fn one() -> usize {
    1
}
fn default_refl_t_hi() -> usize {
    250
}
fn default_pretrain_weight() -> f64 {
    1.0
}

/// One `[[reward]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// The reward kind, as `--reward` names it (`pickscore`, `hpsv2`, `aesthetic`, ...).
    pub kind: String,
    /// Its checkpoint folder.
    pub path: PathBuf,
    /// The weight of its loss `weight·(offset − score)` (default: ReNO's for the kind).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// The reward fine-tuning method, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RewardMethod {
    /// DRaFT-K, or DRaFT-LV with `lv > 0` (Clark et al. 2024).
    Draft {
        /// Final steps with gradients.
        k: usize,
        /// Noised copies of the last step (DRaFT-LV); 0 for DRaFT-K.
        lv: usize,
    },
    /// AlignProp (Prabhudesai et al. 2023): randomised truncation, every step checkpointed.
    AlignProp {
        /// The most final steps with gradients.
        k: usize,
    },
    /// ReFL (Xu et al. 2023): a one-step x0 prediction at a late timestep.
    Refl {
        /// Lowest timestep.
        t_lo: usize,
        /// Highest timestep.
        t_hi: usize,
        /// Weight of the pre-training loss.
        pretrain_weight: f64,
    },
}

impl RewardMethod {
    /// The recipe name.
    pub fn name(self) -> &'static str {
        match self {
            RewardMethod::Draft { .. } => "draft",
            RewardMethod::AlignProp { .. } => "alignprop",
            RewardMethod::Refl { .. } => "refl",
        }
    }
}

/// A reward of the plan: the model and its weight override.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedReward {
    /// Kind and folder.
    pub spec: RewardSpec,
    /// Loss weight; `None` takes ReNO's default for the kind.
    pub weight: Option<f64>,
}

/// The validated reward fine-tuning settings of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardFtPlan {
    /// The method.
    pub method: RewardMethod,
    /// DDIM steps of every sampled image.
    pub sample_steps: usize,
    /// Classifier-free guidance while sampling.
    pub guidance: f64,
    /// The rewards, in recipe order.
    pub rewards: Vec<PlannedReward>,
}

/// Validates the reward fine-tuning parts of the recipe at `path`: `Some` for a reward method,
/// `None` for a preference method (which must then have neither `[reward_ft]` nor `[[reward]]`).
pub fn plan(
    path: &Path,
    method: &str,
    section: Option<&RewardFtSection>,
    rewards: &[RewardSection],
) -> Result<Option<RewardFtPlan>> {
    let err = |key: &str, reason: String| Error::config(path, key, reason);
    if !REWARD_METHODS.contains(&method) {
        if section.is_some() || !rewards.is_empty() {
            let table = if section.is_some() { "reward_ft" } else { "reward" };
            return Err(err(
                table,
                format!(
                    "only the reward methods ({}) read it, got method {method:?}",
                    REWARD_METHODS.join(", ")
                ),
            ));
        }
        return Ok(None);
    }
    let s = section.cloned().unwrap_or_default();
    if s.sample_steps == 0 {
        return Err(err("reward_ft.sample_steps", "must be > 0, got 0".into()));
    }
    if !s.guidance.is_finite() || s.guidance < 0.0 {
        return Err(err(
            "reward_ft.guidance",
            format!("must be a finite value >= 0, got {}", s.guidance),
        ));
    }
    let within = |key: &str, k: usize| -> Result<usize> {
        if k == 0 || k > s.sample_steps {
            return Err(err(
                key,
                format!("must be in [1, sample_steps = {}], got {k}", s.sample_steps),
            ));
        }
        Ok(k)
    };
    let method = match method {
        "draft" => {
            let k = within("reward_ft.draft_k", s.draft_k)?;
            if s.draft_lv > 0 && k != 1 {
                return Err(err(
                    "reward_ft.draft_lv",
                    format!("DRaFT-LV noises copies of the last step only: needs draft_k = 1, got {k}"),
                ));
            }
            RewardMethod::Draft { k, lv: s.draft_lv }
        }
        "alignprop" => RewardMethod::AlignProp {
            k: within("reward_ft.alignprop_k", s.alignprop_k.unwrap_or(s.sample_steps))?,
        },
        _ => {
            if s.refl_t_lo > s.refl_t_hi {
                return Err(err(
                    "reward_ft.refl_t_lo",
                    format!("must be <= refl_t_hi = {}, got {}", s.refl_t_hi, s.refl_t_lo),
                ));
            }
            if !s.refl_pretrain_weight.is_finite() || s.refl_pretrain_weight < 0.0 {
                return Err(err(
                    "reward_ft.refl_pretrain_weight",
                    format!("must be a finite value >= 0, got {}", s.refl_pretrain_weight),
                ));
            }
            RewardMethod::Refl {
                t_lo: s.refl_t_lo,
                t_hi: s.refl_t_hi,
                pretrain_weight: s.refl_pretrain_weight,
            }
        }
    };
    if rewards.is_empty() {
        return Err(err(
            "reward",
            format!(
                "the {method} method needs at least one [[reward]] table (kind, path, weight)",
                method = method.name()
            ),
        ));
    }
    let rewards = rewards
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let kind: RewardKind = r
                .kind
                .parse()
                .map_err(|e: Error| err(&format!("reward[{i}].kind"), e.to_string()))?;
            if let Some(w) = r.weight.filter(|w| !w.is_finite()) {
                return Err(err(&format!("reward[{i}].weight"), format!("must be finite, got {w}")));
            }
            Ok(PlannedReward {
                spec: RewardSpec {
                    kind,
                    path: r.path.clone(),
                },
                weight: r.weight,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(RewardFtPlan {
        method,
        sample_steps: s.sample_steps,
        guidance: s.guidance,
        rewards,
    }))
}

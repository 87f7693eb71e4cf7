//! Training and evaluation on language-model preference pairs: DPO-family (and KTO) fine-tuning
//! of a causal LM against its frozen starting point ([`policy`]), and Bradley-Terry / GPM reward
//! models ([`reward_model`]). One loop serves both: shuffled batches from a seeded RNG, the chosen
//! optimizer (AdamW by default) with f32 master weights, global gradient-norm clipping, one JSON record per step; [`save`] writes
//! the results as folders that transformers and PEFT load.

mod policy;
mod reward_model;
mod save;

pub use policy::{evaluate_policy, policy_loss, train_policy, PolicyData, PolicyMetrics};
pub use reward_model::{evaluate_reward_model, reward_model_outcomes, train_reward_model, HeadSettings};
pub use save::PEFT_LM_PREFIX;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::models::llama::LlamaConfig;
use crate::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use crate::rng::Rng;
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
    /// The optimizer and its settings.
    pub optimizer: OptimizerConfig,
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
pub struct LmStepRecord {
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

/// Runs `steps` optimizer steps of `loss_fn` (loss and batch accuracy) over shuffled batches of `items`.
fn train_loop<T>(
    vars: Vec<(String, Var)>,
    items: &[T],
    s: &TrainSettings,
    mut loss_fn: impl FnMut(&[&T]) -> Result<(Tensor, f64)>,
    on_step: &mut dyn FnMut(&LmStepRecord),
) -> Result<Vec<LmStepRecord>> {
    s.validate(items.len())?;
    let tensors: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let mut opt = Optimizer::new(vars, s.optimizer)?;
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
        let r = LmStepRecord {
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

pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

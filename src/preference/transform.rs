//! Reward transformation and combination (Wang et al., arXiv 2402.00742): the log-sigmoid-
//! centred transform `u = logsigmoid(r - r_ref)` and the sum of transformed properties, the
//! log-probability that a response is good on every property at once.

use candle_core::Tensor;

use super::objective::log_sigmoid;
use crate::{Error, Result};

/// Where a property's reference reward `r_ref` comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum RefReward {
    /// A fixed value.
    Fixed(f64),
    /// The `q`-quantile (0..=1, linear interpolation as numpy's default) of the rewards of
    /// base-model samples.
    Quantile {
        /// The quantile.
        q: f64,
        /// Rewards of the base model's samples for this prompt.
        samples: Vec<f64>,
    },
    /// The reward of one given reference response.
    Response(f64),
}

impl RefReward {
    /// The reference value; an error for an empty sample set or a quantile outside [0, 1].
    pub fn value(&self) -> Result<f64> {
        match self {
            RefReward::Fixed(v) | RefReward::Response(v) => Ok(*v),
            RefReward::Quantile { q, samples } => quantile(samples, *q),
        }
    }
}

/// The `q`-quantile of `xs` with linear interpolation between order statistics.
pub fn quantile(xs: &[f64], q: f64) -> Result<f64> {
    if xs.is_empty() {
        return Err(Error::input(
            "reference samples",
            "a quantile needs at least one sample",
        ));
    }
    if !(0.0..=1.0).contains(&q) {
        return Err(Error::input("quantile", format!("must be in [0, 1], got {q}")));
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Ok(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// `logsigmoid(r - r_ref)`, elementwise.
pub fn log_sigmoid_centered(r: &Tensor, r_ref: f64) -> Result<Tensor> {
    log_sigmoid(&(r - r_ref)?)
}

/// `sum_p logsigmoid(r[:, p] - r_ref[p])` for rewards `[N, P]` (P properties) and one reference
/// per property; `[N]`.
pub fn combine(rewards: &Tensor, r_ref: &[f64]) -> Result<Tensor> {
    let (_, p) = rewards.dims2()?;
    if p != r_ref.len() {
        return Err(Error::input(
            "reward transform",
            format!("{p} properties but {} reference rewards", r_ref.len()),
        ));
    }
    let refs = Tensor::new(r_ref, rewards.device())?.to_dtype(rewards.dtype())?;
    Ok(log_sigmoid(&rewards.broadcast_sub(&refs)?)?.sum(1)?)
}

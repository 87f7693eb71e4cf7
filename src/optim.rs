//! AdamW with f32 master weights and state whatever the compute dtype, global gradient-norm
//! clipping, and learning-rate schedules. Counterparts: `torch.optim.AdamW` (decoupled weight
//! decay, bias-corrected moments), `torch.nn.utils.clip_grad_norm_`, and diffusers'
//! `get_scheduler` (`constant`, `constant_with_warmup`, `cosine`).

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyperparameters (PyTorch's defaults except weight decay, which is diffusers' 1e-2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// First-moment decay.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Denominator epsilon.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    1e-2
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One trainable tensor: the model's `Var` (any dtype) and the optimizer's f32 copies.
#[derive(Debug)]
pub struct Param {
    /// Checkpoint name (diffusers or LoRA key).
    pub name: String,
    /// The tensor the model computes with.
    pub var: Var,
    /// f32 master weights.
    pub master: Tensor,
    /// First moment, f32.
    pub m: Tensor,
    /// Second moment, f32.
    pub v: Tensor,
}

/// AdamW over named parameters.
#[derive(Debug)]
pub struct AdamW {
    /// The parameters with their state.
    pub params: Vec<Param>,
    /// Hyperparameters.
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    /// An optimizer over `vars` (name, var) with zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let master = var.as_tensor().to_dtype(DType::F32)?.detach();
                let m = master.zeros_like()?;
                let v = master.zeros_like()?;
                Ok(Param {
                    name,
                    var,
                    master,
                    m,
                    v,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            config,
            step: 0,
        })
    }

    /// One update with learning rate `lr` from f32 gradients aligned with `params`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::input(
                "gradients",
                format!("expected {}, got {}", self.params.len(), grads.len()),
            ));
        }
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            // candle's gradients may still reference the forward graph (a matmul's gradient is an
            // op on the weight); detached, the moments do not chain every step's graph together.
            let g = g.to_dtype(DType::F32)?.detach();
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let denom = ((p.v.clone() / bc2)?.sqrt()? + c.eps)?;
            let update = ((&p.m / bc1)? / denom)?;
            // Decoupled decay first, as torch.optim.AdamW: w <- w * (1 - lr * wd) - lr * update.
            let decayed = (&p.master * (1.0 - lr * c.weight_decay))?;
            p.master = (decayed - (update * lr)?)?.detach();
            p.var.set(&p.master.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }
}

/// SGD with momentum on one tensor, as `torch.optim.SGD` (no dampening, no weight decay): the
/// buffer starts at the first gradient, then `b = m·b + g`; the step is `−lr·(g + m·b)` with
/// Nesterov momentum and `−lr·b` without. ReNO optimises its noise with it.
#[derive(Debug, Clone)]
pub struct Sgd {
    lr: f64,
    momentum: f64,
    nesterov: bool,
    buf: Option<Tensor>,
}

impl Sgd {
    /// A fresh optimizer.
    pub fn new(lr: f64, momentum: f64, nesterov: bool) -> Self {
        Sgd {
            lr,
            momentum,
            nesterov,
            buf: None,
        }
    }

    /// The parameter after one step from `param` with gradient `grad` (both detached).
    pub fn step(&mut self, param: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let direction = if self.momentum == 0.0 {
            grad.clone()
        } else {
            let buf = match &self.buf {
                None => grad.clone(),
                Some(b) => ((b * self.momentum)? + grad)?,
            };
            self.buf = Some(buf.clone());
            if self.nesterov {
                (grad + (buf * self.momentum)?)?
            } else {
                buf
            }
        };
        Ok((param - (direction * self.lr)?)?.detach())
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping (`clip_grad_norm_` semantics: factor `max_norm / (norm + 1e-6)` when above).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: Option<f64>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if let Some(max) = max_norm {
        if norm > max {
            let factor = max / (norm + 1e-6);
            for g in grads.iter_mut() {
                *g = (&*g * factor)?;
            }
        }
    }
    Ok(norm)
}

/// Learning-rate schedules (diffusers' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up from 0, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then a half cosine down to 0 at the last step.
    Cosine,
}

impl LrSchedule {
    /// The rate at optimizer step `step` (0-based) of `total`, with `warmup` warm-up steps.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        let warm = |s: usize| {
            if warmup > 0 && s < warmup {
                s as f64 / warmup as f64
            } else {
                1.0
            }
        };
        match self {
            LrSchedule::Constant => base,
            LrSchedule::ConstantWithWarmup => base * warm(step),
            LrSchedule::Cosine => {
                if step < warmup {
                    return base * warm(step);
                }
                let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

//! Adafactor (Shazeer & Stern 2018) as transformers' `Adafactor` with `scale_parameter=False,
//! relative_step=False, warmup_init=False` and an external learning rate (the setting of the
//! SDXL Diffusion-DPO launcher).
//!
//! Per step, with `β2ₜ = 1 - tᵈᵉᶜᵃʸ` and `u = g² + eps`: a parameter of 2 or more dimensions keeps
//! running means of `u` over its last dimension (`row`, shape `[..., R]`) and over its
//! second-to-last (`col`, `[..., C]`), and approximates `1/√v` by
//! `rsqrt(row / mean(row)) ⊗ rsqrt(col)`; a 1-D parameter keeps the full `v`. The update
//! `g/√v` is divided by `max(rms(update) / clip_threshold, 1)` and scaled by `lr`; with `beta1`
//! it is then averaged into a first moment. Weight decay is `w -= wd·lr·w`, before `w -= update`.
//! (transformers' `eps[1]` only scales the learning rate by the parameter's RMS, which this
//! setting turns off.)
//!
//! Checkpoint names: `v_row.<param>` and `v_col.<param>` (factored) or `v.<param>`, and
//! `m.<param>` with `beta1`.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{tensor_bytes, ParamState, StateReader};
use crate::Result;

/// Adafactor hyperparameters (transformers' defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdafactorConfig {
    /// First-moment decay; none (the default) keeps no first moment.
    #[serde(default)]
    pub beta1: Option<f64>,
    /// Added to the squared gradient (transformers' `eps[0]`).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Largest RMS of an update before it is scaled down.
    #[serde(default = "default_clip_threshold")]
    pub clip_threshold: f64,
    /// Exponent of the second-moment decay `1 - t^decay_rate`.
    #[serde(default = "default_decay_rate")]
    pub decay_rate: f64,
    /// Weight decay, scaled by the learning rate.
    #[serde(default)]
    pub weight_decay: f64,
}

fn default_eps() -> f64 {
    1e-30
}
fn default_clip_threshold() -> f64 {
    1.0
}
fn default_decay_rate() -> f64 {
    -0.8
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig {
            beta1: None,
            eps: default_eps(),
            clip_threshold: default_clip_threshold(),
            decay_rate: default_decay_rate(),
            weight_decay: 0.0,
        }
    }
}

/// The second moment: factored for 2 or more dimensions, full otherwise.
#[derive(Debug)]
enum Second {
    Factored { row: Tensor, col: Tensor },
    Full(Tensor),
}

/// The Adafactor state of one parameter.
#[derive(Debug)]
pub(super) struct State {
    config: AdafactorConfig,
    m: Option<Tensor>,
    v: Second,
}

impl State {
    /// Zero state for a parameter with f32 master weights `master`.
    pub(super) fn new(config: AdafactorConfig, master: &Tensor) -> Result<Self> {
        let dims = master.dims();
        let r = dims.len();
        let v = if r >= 2 {
            let mut col = dims[..r - 2].to_vec();
            col.push(dims[r - 1]);
            Second::Factored {
                row: Tensor::zeros(&dims[..r - 1], DType::F32, master.device())?,
                col: Tensor::zeros(col, DType::F32, master.device())?,
            }
        } else {
            Second::Full(master.zeros_like()?)
        };
        let m = match config.beta1 {
            Some(_) => Some(master.zeros_like()?),
            None => None,
        };
        Ok(State { config, m, v })
    }
}

/// `a * beta + b * (1 - beta)`, detached.
fn ema(a: &Tensor, b: &Tensor, beta: f64) -> Result<Tensor> {
    Ok(((a * beta)? + (b * (1.0 - beta))?)?.detach())
}

impl ParamState for State {
    fn update(&mut self, master: &Tensor, g: &Tensor, lr: f64, step: usize) -> Result<Tensor> {
        let c = self.config;
        let beta2t = 1.0 - (step as f64).powf(c.decay_rate);
        let sq = (g.sqr()? + c.eps)?;
        let mut update = match &mut self.v {
            Second::Factored { row, col } => {
                let r = g.rank();
                *row = ema(row, &sq.mean(r - 1)?, beta2t)?;
                *col = ema(col, &sq.mean(r - 2)?, beta2t)?;
                let row_factor = row
                    .broadcast_div(&row.mean_keepdim(D::Minus1)?)?
                    .sqrt()?
                    .recip()?
                    .unsqueeze(r - 1)?;
                let col_factor = col.unsqueeze(r - 2)?.sqrt()?.recip()?;
                row_factor.broadcast_mul(&col_factor)?.mul(g)?
            }
            Second::Full(v) => {
                *v = ema(v, &sq, beta2t)?;
                v.sqrt()?.recip()?.mul(g)?
            }
        };
        // rms(update) in f64, rounded to f32 as transformers' f32 norm.
        let sum_sq = update.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let rms = (sum_sq.sqrt() as f32) / (update.elem_count() as f64).sqrt() as f32;
        let denom = (rms / c.clip_threshold as f32).max(1.0);
        update = (update.broadcast_div(&Tensor::new(denom, g.device())?)? * lr)?;
        if let (Some(beta1), Some(m)) = (c.beta1, &mut self.m) {
            *m = ema(m, &update, beta1)?;
            update = m.clone();
        }
        let mut w = master.clone();
        if c.weight_decay != 0.0 {
            w = (&w + (&w * (-c.weight_decay * lr))?)?;
        }
        Ok((w - update)?.detach())
    }

    fn tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        let mut out = match &self.v {
            Second::Factored { row, col } => vec![
                (format!("v_row.{name}"), row.clone()),
                (format!("v_col.{name}"), col.clone()),
            ],
            Second::Full(v) => vec![(format!("v.{name}"), v.clone())],
        };
        if let Some(m) = &self.m {
            out.push((format!("m.{name}"), m.clone()));
        }
        out
    }

    fn load(&mut self, name: &str, shape: &[usize], read: &mut StateReader) -> Result<()> {
        match &mut self.v {
            Second::Factored { row, col } => {
                *row = read(&format!("v_row.{name}"), row.dims(), DType::F32)?;
                *col = read(&format!("v_col.{name}"), col.dims(), DType::F32)?;
            }
            Second::Full(v) => *v = read(&format!("v.{name}"), shape, DType::F32)?,
        }
        if let Some(m) = &mut self.m {
            *m = read(&format!("m.{name}"), shape, DType::F32)?;
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        let v = match &self.v {
            Second::Factored { row, col } => tensor_bytes(row) + tensor_bytes(col),
            Second::Full(v) => tensor_bytes(v),
        };
        v + self.m.as_ref().map_or(0, tensor_bytes)
    }
}

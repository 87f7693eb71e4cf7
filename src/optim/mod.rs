//! The optimizers of the trainers, with f32 master weights whatever the compute dtype: AdamW
//! (`torch.optim.AdamW`: decoupled weight decay, bias-corrected moments), bitsandbytes' 8-bit
//! AdamW ([`adamw8bit`]) and transformers' Adafactor ([`adafactor`]), all behind one
//! [`Optimizer`]; SGD for ReNO; global gradient-norm clipping (`torch.nn.utils.clip_grad_norm_`);
//! and diffusers' learning-rate schedules (`constant`, `constant_with_warmup`, `cosine`).

pub mod adafactor;
pub mod adamw8bit;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use adafactor::AdafactorConfig;
pub use adamw8bit::AdamW8bitConfig;

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

/// Which optimizer, with its hyperparameters: the recipe's `[train.optimizer]` table, chosen by
/// its `kind` key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum OptimizerConfig {
    /// `torch.optim.AdamW`, f32 moments.
    #[serde(rename = "adamw")]
    AdamW(AdamWConfig),
    /// bitsandbytes' `AdamW8bit`: blockwise 8-bit moments.
    #[serde(rename = "adamw8bit")]
    AdamW8bit(AdamW8bitConfig),
    /// transformers' `Adafactor` with an external learning rate.
    #[serde(rename = "adafactor")]
    Adafactor(AdafactorConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::AdamW(AdamWConfig::default())
    }
}

impl From<AdamWConfig> for OptimizerConfig {
    fn from(c: AdamWConfig) -> Self {
        OptimizerConfig::AdamW(c)
    }
}

impl OptimizerConfig {
    /// The `kind` name (`adamw`, `adamw8bit`, `adafactor`).
    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerConfig::AdamW(_) => "adamw",
            OptimizerConfig::AdamW8bit(_) => "adamw8bit",
            OptimizerConfig::Adafactor(_) => "adafactor",
        }
    }

    /// Checks the hyperparameters; the error names the key (`beta2`) and the value.
    pub fn validate(&self) -> Result<()> {
        let unit = |key: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::input(key, format!("must be in [0, 1), got {v}")))
            }
        };
        let non_negative = |key: &str, v: f64| {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::input(key, format!("must be >= 0, got {v}")))
            }
        };
        let adam = |c: &AdamWConfig| -> Result<()> {
            unit("beta1", c.beta1)?;
            unit("beta2", c.beta2)?;
            crate::error::positive("eps", c.eps)?;
            non_negative("weight_decay", c.weight_decay)
        };
        match self {
            OptimizerConfig::AdamW(c) => adam(c),
            OptimizerConfig::AdamW8bit(c) => adam(&AdamWConfig {
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
            }),
            OptimizerConfig::Adafactor(c) => {
                if let Some(b) = c.beta1 {
                    unit("beta1", b)?;
                }
                crate::error::positive("eps", c.eps)?;
                crate::error::positive("clip_threshold", c.clip_threshold)?;
                if !(c.decay_rate < 0.0 && c.decay_rate.is_finite()) {
                    return Err(Error::input("decay_rate", format!("must be < 0, got {}", c.decay_rate)));
                }
                non_negative("weight_decay", c.weight_decay)
            }
        }
    }

    /// About how many bytes of state the optimizer keeps per trained parameter of a diffusion
    /// UNet, for memory estimates before a run (measured on unet-mid, see BENCHMARKS.md;
    /// [`Optimizer::state_bytes`] counts a built optimizer's exactly).
    pub fn state_bytes_per_param(&self) -> f64 {
        match self {
            OptimizerConfig::AdamW(_) => 8.0,
            // Two codes, two f32 scales per 256 elements, and the f32 moments of small tensors.
            OptimizerConfig::AdamW8bit(_) => 2.1,
            // Measured 1.97: a 3x3 conv kernel is factored over its window, so its rows and
            // columns are 2/3 of it; linear layers' factored state is negligible.
            OptimizerConfig::Adafactor(c) => 2.0 + if c.beta1.is_some() { 4.0 } else { 0.0 },
        }
    }

    /// The state of one parameter whose f32 master copy is `master`.
    fn new_state(&self, master: &Tensor) -> Result<Box<dyn ParamState>> {
        Ok(match *self {
            OptimizerConfig::AdamW(c) => Box::new(AdamState {
                config: c,
                m: master.zeros_like()?,
                v: master.zeros_like()?,
            }),
            OptimizerConfig::AdamW8bit(c) => adamw8bit::new_state(c, master)?,
            OptimizerConfig::Adafactor(c) => Box::new(adafactor::State::new(c, master)?),
        })
    }
}

/// Reads one saved state tensor by checkpoint name, expected shape and dtype.
pub type StateReader<'a> = dyn FnMut(&str, &[usize], DType) -> Result<Tensor> + 'a;

/// The optimizer state of one parameter, whatever the kind.
trait ParamState: std::fmt::Debug + Send + Sync {
    /// The new master weights after one update from `master` with the f32 gradient `g` at
    /// learning rate `lr`; `step` counts from 1.
    fn update(&mut self, master: &Tensor, g: &Tensor, lr: f64, step: usize) -> Result<Tensor>;
    /// The state as named tensors for a checkpoint (`m.<name>`, ...).
    fn tensors(&self, name: &str) -> Vec<(String, Tensor)>;
    /// Restores the state of parameter `name` (shape `shape`) saved by [`ParamState::tensors`].
    fn load(&mut self, name: &str, shape: &[usize], read: &mut StateReader) -> Result<()>;
    /// Bytes held by the state tensors.
    fn bytes(&self) -> usize;
}

/// Bytes of `t`'s elements.
fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// AdamW's f32 moments, updated as `torch.optim.AdamW`.
#[derive(Debug)]
struct AdamState {
    config: AdamWConfig,
    m: Tensor,
    v: Tensor,
}

impl ParamState for AdamState {
    fn update(&mut self, master: &Tensor, g: &Tensor, lr: f64, step: usize) -> Result<Tensor> {
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2 = 1.0 - c.beta2.powi(step as i32);
        self.m = ((&self.m * c.beta1)? + (g * (1.0 - c.beta1))?)?.detach();
        self.v = ((&self.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
        let denom = ((self.v.clone() / bc2)?.sqrt()? + c.eps)?;
        let update = ((&self.m / bc1)? / denom)?;
        // Decoupled decay first, as torch.optim.AdamW: w <- w * (1 - lr * wd) - lr * update.
        let decayed = (master * (1.0 - lr * c.weight_decay))?;
        Ok((decayed - (update * lr)?)?.detach())
    }

    fn tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        vec![
            (format!("m.{name}"), self.m.clone()),
            (format!("v.{name}"), self.v.clone()),
        ]
    }

    fn load(&mut self, name: &str, shape: &[usize], read: &mut StateReader) -> Result<()> {
        self.m = read(&format!("m.{name}"), shape, DType::F32)?;
        self.v = read(&format!("v.{name}"), shape, DType::F32)?;
        Ok(())
    }

    fn bytes(&self) -> usize {
        tensor_bytes(&self.m) + tensor_bytes(&self.v)
    }
}

/// One trainable tensor: the model's `Var` (any dtype) and the optimizer's f32 master copy.
#[derive(Debug)]
pub struct Param {
    /// Checkpoint name (diffusers or LoRA key).
    pub name: String,
    /// The tensor the model computes with.
    pub var: Var,
    /// f32 master weights.
    pub master: Tensor,
}

/// An optimizer of any [`OptimizerConfig`] kind over named parameters.
#[derive(Debug)]
pub struct Optimizer {
    /// The parameters with their master weights.
    pub params: Vec<Param>,
    /// Each parameter's state, aligned with `params`.
    states: Vec<Box<dyn ParamState>>,
    /// Which optimizer, with its hyperparameters.
    pub config: OptimizerConfig,
    /// Optimizer steps taken.
    pub step: usize,
}

impl Optimizer {
    /// An optimizer over `vars` (name, var) with fresh state.
    pub fn new(vars: Vec<(String, Var)>, config: impl Into<OptimizerConfig>) -> Result<Self> {
        let config = config.into();
        let mut params = Vec::with_capacity(vars.len());
        let mut states = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let master = var.as_tensor().to_dtype(DType::F32)?.detach();
            states.push(config.new_state(&master)?);
            params.push(Param { name, var, master });
        }
        Ok(Optimizer {
            params,
            states,
            config,
            step: 0,
        })
    }

    /// One update with learning rate `lr` from f32 gradients aligned with `params`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.update_scaled(grads, lr, |_| 1.0)
    }

    /// [`Optimizer::update`] with parameter `p`'s rate `lr * factor(p)`: parameter groups whose
    /// base rates differ, scheduled together (torch's `LambdaLR` over several groups).
    pub fn update_scaled(&mut self, grads: &[Tensor], lr: f64, factor: impl Fn(&Param) -> f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::input(
                "gradients",
                format!("expected {}, got {}", self.params.len(), grads.len()),
            ));
        }
        self.step += 1;
        for ((p, state), g) in self.params.iter_mut().zip(&mut self.states).zip(grads) {
            // candle's gradients may still reference the forward graph (a matmul's gradient is an
            // op on the weight); detached, the state does not chain every step's graph together.
            let g = g.to_dtype(DType::F32)?.detach();
            p.master = state.update(&p.master, &g, lr * factor(p), self.step)?;
            p.var.set(&p.master.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// The optimizer state as named tensors, for a checkpoint: AdamW's `m.<param>` and
    /// `v.<param>`, and the names each kind's module documents.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.states)
            .flat_map(|(p, s)| s.tensors(&p.name))
            .collect()
    }

    /// Restores the state saved by [`Optimizer::state_tensors`]; `read` loads a tensor by name,
    /// expected shape and dtype.
    pub fn load_state(&mut self, read: &mut StateReader) -> Result<()> {
        for (p, s) in self.params.iter().zip(&mut self.states) {
            s.load(&p.name, p.master.dims(), read)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state (moments, quantization scales), master weights not included.
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(|s| s.bytes()).sum()
    }

    /// Bytes of the f32 master weights.
    pub fn master_bytes(&self) -> usize {
        self.params.iter().map(|p| tensor_bytes(&p.master)).sum()
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

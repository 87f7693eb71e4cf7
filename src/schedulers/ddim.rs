//! `DDIMScheduler`: denoising diffusion implicit models (Song, Meng & Ermon, 2020,
//! arXiv 2010.02502); diffusers' `src/diffusers/schedulers/scheduling_ddim.py`.
//!
//! Step t → t − T div N with integer timesteps (for every spacing, as diffusers does).
//! eta = 0 (the pipeline default) is deterministic; eta > 0 adds `eta·σ_t·z` noise.
//! Samples and model outputs are [B, C, H, W] (any shape, the same for both); the math runs in
//! float32 and the result has the sample's dtype.

use candle_core::{DType, Tensor};

use super::config::{PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing};
use super::noise_schedule::{check_step_shapes, div_f32, mul_f32, step_index_error, NoiseSchedule, TimestepValues};
use super::Scheduler;
use crate::rng::Rng;
use crate::{Error, Result};

/// One DDIM move of `sample` from noise level ᾱ_t to ᾱ_to, the building block of DDIM and
/// inverse DDIM:
/// `x0 = f(model_output, sample)` (per prediction type, clamped to `±clip` if given),
/// `ε = g(...)`, `out = sqrt(ᾱ_to)·x0 + sqrt(1 − ᾱ_to − std²)·ε (+ std·noise)`.
/// Coefficients are float32, computed in diffusers' order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimMove {
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// ᾱ of the noise level the sample is at.
    pub alpha_prod_t: f64,
    /// ᾱ of the noise level to move to.
    pub alpha_prod_to: f64,
    /// Standard deviation of the added noise (`eta·σ_t`; 0 for plain DDIM).
    pub std_dev: f64,
    /// Clamp the predicted x0 to `[-clip, clip]` (`clip_sample_range` when `clip_sample`).
    pub clip: Option<f64>,
}

impl DdimMove {
    /// Applies the move to `sample` given `model_output` (same shape), adding `std_dev·noise`
    /// when `noise` is given. Runs in float32; returns `sample`'s dtype.
    pub fn apply(&self, model_output: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let out_dtype = sample.dtype();
        let mo = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let a_t = self.alpha_prod_t as f32;
        let b_t = 1.0 - a_t;
        let (sqrt_a, sqrt_b) = (a_t.sqrt(), b_t.sqrt());
        let (mut x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (div_f32(&(&x - mul_f32(&mo, sqrt_b)?)?, sqrt_a)?, mo),
            PredictionType::Sample => {
                let eps = div_f32(&(&x - mul_f32(&mo, sqrt_a)?)?, sqrt_b)?;
                (mo, eps)
            }
            PredictionType::VPrediction => {
                let x0 = (mul_f32(&x, sqrt_a)? - mul_f32(&mo, sqrt_b)?)?;
                let eps = (mul_f32(&mo, sqrt_a)? + mul_f32(&x, sqrt_b)?)?;
                (x0, eps)
            }
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        let a_to = self.alpha_prod_to as f32;
        let std = self.std_dev as f32;
        let direction = mul_f32(&eps, (1.0 - a_to - std * std).sqrt())?;
        let mut out = (mul_f32(&x0, a_to.sqrt())? + direction)?;
        if let Some(noise) = noise {
            check_step_shapes(noise, sample)?;
            out = (out + mul_f32(&noise.to_dtype(DType::F32)?, std)?)?;
        }
        Ok(out.to_dtype(out_dtype)?)
    }
}

/// The settings of a DDIM grid and step (diffusers' constructor arguments of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimSettings {
    /// How the inference timesteps are spread.
    pub timestep_spacing: TimestepSpacing,
    /// Added to every inference timestep.
    pub steps_offset: usize,
    /// ᾱ below timestep 0 is 1 (else ᾱ_0).
    pub set_alpha_to_one: bool,
    /// `clip_sample_range` when `clip_sample`, `None` for no x0 clipping.
    pub clip: Option<f64>,
}

impl DdimSettings {
    /// `timestep_spacing` and the rest of the settings from `cfg` (`steps_offset`,
    /// `set_alpha_to_one`, `clip_sample` and its range).
    pub fn from_config(cfg: &SchedulerConfig, timestep_spacing: TimestepSpacing) -> Self {
        DdimSettings {
            timestep_spacing,
            steps_offset: cfg.steps_offset,
            set_alpha_to_one: cfg.set_alpha_to_one_for(SchedulerKind::Ddim),
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
        }
    }
}

/// diffusers' `DDIMScheduler` set to N inference steps.
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    pub(super) schedule: NoiseSchedule,
    pub(super) timesteps: Vec<f64>,
    pub(super) step_ratio: usize,
    /// ᾱ below timestep 0: 1 with `set_alpha_to_one`, else ᾱ_0.
    pub(super) final_alpha_cumprod: f64,
    pub(super) clip: Option<f64>,
    eta: f64,
}

impl DDIMScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset, `clip_sample` and `set_alpha_to_one` are used).
    /// `thresholding = true` is not supported.
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if cfg.thresholding {
            return Err(cfg.err("thresholding", "dynamic thresholding is not supported, got true"));
        }
        let schedule = NoiseSchedule::from_config(cfg)?;
        let spacing = cfg.timestep_spacing_for(SchedulerKind::Ddim);
        Self::new(&schedule, DdimSettings::from_config(cfg, spacing), num_inference_steps)
    }

    /// The scheduler on `schedule` with explicit `settings`.
    pub fn new(schedule: &NoiseSchedule, settings: DdimSettings, num_inference_steps: usize) -> Result<Self> {
        let DdimSettings {
            timestep_spacing,
            steps_offset,
            set_alpha_to_one,
            clip,
        } = settings;
        let timesteps = schedule.inference_timesteps(
            timestep_spacing,
            steps_offset,
            num_inference_steps,
            TimestepValues::Integer,
        )?;
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod()[0]
        };
        Ok(DDIMScheduler {
            schedule: schedule.clone(),
            timesteps,
            step_ratio: schedule.num_train_timesteps() / num_inference_steps,
            final_alpha_cumprod,
            clip,
            eta: 0.0,
        })
    }

    /// Sets eta (0 = DDIM, 1 = DDPM-like variance); must be finite and >= 0.
    pub fn with_eta(mut self, eta: f64) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::input("eta", format!("must be a finite value >= 0, got {eta}")));
        }
        self.eta = eta;
        Ok(self)
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The move of step `step_index` (t → t − T div N; below timestep 0, ᾱ is
    /// `final_alpha_cumprod`).
    pub fn step_move(&self, step_index: usize) -> Result<DdimMove> {
        let n = self.timesteps.len();
        let t = *self
            .timesteps
            .get(step_index)
            .ok_or_else(|| step_index_error(step_index, n))? as usize;
        let ac = self.schedule.alphas_cumprod();
        let a_t = ac[t];
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => ac[prev],
            None => self.final_alpha_cumprod,
        };
        // diffusers: variance = (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), std = eta·sqrt(variance).
        let std_dev = if self.eta > 0.0 {
            let (a_t, a_prev) = (a_t as f32, a_prev as f32);
            let variance = ((1.0 - a_prev) / (1.0 - a_t)) * (1.0 - a_t / a_prev);
            f64::from(self.eta as f32 * variance.sqrt())
        } else {
            0.0
        };
        Ok(DdimMove {
            prediction_type: self.schedule.prediction_type(),
            alpha_prod_t: a_t,
            alpha_prod_to: a_prev,
            std_dev,
            clip: self.clip,
        })
    }

    /// One step with explicit variance noise (used when eta > 0; ignored otherwise), like
    /// diffusers' `step(..., variance_noise=noise)`.
    pub fn step_with_noise(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mv = self.step_move(step_index)?;
        let noise = if self.eta > 0.0 { noise } else { None };
        if self.eta > 0.0 && noise.is_none() {
            return Err(Error::input("noise", "DDIM with eta > 0 needs variance noise"));
        }
        mv.apply(model_output, sample, noise)
    }
}

impl Scheduler for DDIMScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        if self.eta > 0.0 {
            let noise = rng.randn(sample.shape(), sample.device())?;
            self.step_with_noise(model_output, step_index, sample, Some(&noise))
        } else {
            self.step_with_noise(model_output, step_index, sample, None)
        }
    }
}

//! `DDPMScheduler` sampling: ancestral sampling of denoising diffusion probabilistic models (Ho,
//! Jain & Abbeel, 2020, arXiv 2006.11239, formulas (6) and (7)); diffusers'
//! `src/diffusers/schedulers/scheduling_ddpm.py`.
//!
//! Step t → t' (the next inference timestep, or below 0 at the end): the predicted x0 (clamped to
//! `±clip_sample_range` with `clip_sample`, diffusers' default) and the sample are mixed by the
//! posterior mean coefficients, then `σ·z` is added while t > 0, with σ from `variance_type`
//! (fixed_small, fixed_small_log, fixed_large; learned variances need a model that predicts
//! them and are not supported, and fixed_large_log is NaN in diffusers). The noise comes from diffalign's [`Rng`];
//! [`DDPMScheduler::step_with_noise`] takes it explicitly. Integer timesteps on DDIM's grid, no
//! input scaling, initial noise scale 1. The training helpers (`add_noise`, `velocity`) are
//! [`NoiseSchedule`]'s. Samples and model outputs are [B, C, H, W] (any shape, the same for
//! both); the math runs in float32 and the result has the sample's dtype.

use candle_core::{DType, Tensor};

use super::config::{PredictionType, SchedulerConfig, SchedulerKind, VarianceType};
use super::noise_schedule::{check_step_shapes, div_f32, mul_f32, step_index_error, NoiseSchedule, TimestepValues};
use super::Scheduler;
use crate::rng::Rng;
use crate::Result;

/// diffusers' `DDPMScheduler` set to N inference steps.
#[derive(Debug, Clone)]
pub struct DDPMScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    variance_type: VarianceType,
    /// `clip_sample_range` when `clip_sample`, `None` for no x0 clipping.
    clip: Option<f64>,
}

/// The float32 coefficients of one DDPM step.
struct DdpmStep {
    /// Whether noise is added (the timestep is above 0).
    noisy: bool,
    pred_original_sample_coeff: f32,
    current_sample_coeff: f32,
    /// The standard deviation of the added noise.
    std: f32,
}

impl DDPMScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset, `clip_sample` and `variance_type` are used).
    /// Thresholding and learned variances are errors naming the key.
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if cfg.thresholding {
            return Err(cfg.err("thresholding", "dynamic thresholding is not supported, got true"));
        }
        let variance_type = cfg.variance_type.unwrap_or(VarianceType::FixedSmall);
        match variance_type {
            VarianceType::Learned | VarianceType::LearnedRange => {
                return Err(cfg.err(
                    "variance_type",
                    format!("learned variances are not supported for sampling, got {variance_type:?}"),
                ))
            }
            // diffusers takes the square root of ln β_t < 0: every noisy step is NaN.
            VarianceType::FixedLargeLog => {
                return Err(cfg.err(
                    "variance_type",
                    "fixed_large_log gives NaN samples in diffusers, got it",
                ))
            }
            _ => {}
        }
        let schedule = NoiseSchedule::from_config(cfg)?;
        let timesteps = schedule.inference_timesteps(
            cfg.timestep_spacing_for(SchedulerKind::Ddpm),
            cfg.steps_offset,
            num_inference_steps,
            TimestepValues::Integer,
        )?;
        Ok(DDPMScheduler {
            schedule,
            timesteps,
            variance_type,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
        })
    }

    /// The coefficients of step `step_index`, in diffusers' float32 order.
    fn coefficients(&self, step_index: usize) -> Result<DdpmStep> {
        let n = self.timesteps.len();
        let t = *self
            .timesteps
            .get(step_index)
            .ok_or_else(|| step_index_error(step_index, n))? as usize;
        let ac = self.schedule.alphas_cumprod();
        let a_t = ac[t] as f32;
        let a_prev = self
            .timesteps
            .get(step_index + 1)
            .map_or(1.0, |&p| ac[p as usize] as f32);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let current_alpha_t = a_t / a_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let variance = ((1.0 - a_prev) / (1.0 - a_t) * current_beta_t).max(1e-20);
        let std = match self.variance_type {
            VarianceType::FixedSmall => variance.sqrt(),
            VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
            VarianceType::FixedLarge => current_beta_t.sqrt(),
            _ => unreachable!("from_config rejects the other variance types"),
        };
        Ok(DdpmStep {
            noisy: t > 0,
            pred_original_sample_coeff: a_prev.sqrt() * current_beta_t / b_t,
            current_sample_coeff: current_alpha_t.sqrt() * b_prev / b_t,
            std,
        })
    }

    /// Whether step `step_index` adds noise (its timestep is above 0).
    pub fn step_adds_noise(&self, step_index: usize) -> Result<bool> {
        Ok(self.coefficients(step_index)?.noisy)
    }

    /// One step with the variance noise `noise` (standard normal, the sample's shape; required
    /// when the step adds noise, see [`DDPMScheduler::step_adds_noise`], ignored otherwise).
    pub fn step_with_noise(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let c = self.coefficients(step_index)?;
        let t = self.timesteps[step_index] as usize;
        let a_t = self.schedule.alphas_cumprod()[t] as f32;
        let b_t = 1.0 - a_t;
        let mo = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let mut x0 = match self.schedule.prediction_type() {
            PredictionType::Epsilon => div_f32(&(&x - mul_f32(&mo, b_t.sqrt())?)?, a_t.sqrt())?,
            PredictionType::Sample => mo,
            PredictionType::VPrediction => (mul_f32(&x, a_t.sqrt())? - mul_f32(&mo, b_t.sqrt())?)?,
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        let mut prev = (mul_f32(&x0, c.pred_original_sample_coeff)? + mul_f32(&x, c.current_sample_coeff)?)?;
        if c.noisy {
            let noise = noise.ok_or_else(|| crate::Error::input("noise", "this DDPM step needs variance noise"))?;
            check_step_shapes(noise, sample)?;
            prev = (prev + mul_f32(&noise.to_dtype(DType::F32)?, c.std)?)?;
        }
        Ok(prev.to_dtype(sample.dtype())?)
    }
}

impl Scheduler for DDPMScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        if self.step_adds_noise(step_index)? {
            let noise = rng.randn(sample.shape(), sample.device())?;
            self.step_with_noise(model_output, step_index, sample, Some(&noise))
        } else {
            self.step_with_noise(model_output, step_index, sample, None)
        }
    }
}

//! `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in sigma space
//! (Karras et al., 2022, arXiv 2206.00364, Algorithm 2 without churn); diffusers'
//! `src/diffusers/schedulers/scheduling_euler_discrete.py`.
//!
//! Samples live at `x0 + σ·ε`; the model sees `sample / sqrt(σ² + 1)` at float timesteps whose
//! sigmas are interpolated from the training sigmas. A one-step trailing schedule (SD-Turbo)
//! runs at timestep 999. Samples and model outputs are [B, C, H, W] (any shape, the same for
//! both); the math runs in float32 and the result has the model output's dtype, as in diffusers.
//! Karras and exponential sigmas (`use_karras_sigmas`, `use_exponential_sigmas`, between
//! `sigma_min` and `sigma_max` when given) move the timesteps to the sigmas' fractional training
//! timesteps. Not supported (an error naming the key): beta sigmas, log-linear interpolation;
//! `s_churn` is always 0 (the pipelines' default).

use candle_core::{DType, Tensor};

use super::config::{InterpolationType, PredictionType, SchedulerConfig, SchedulerKind};
use super::noise_schedule::{check_step_shapes, div_f32, mul_f32, NoiseSchedule, SigmaLayout, SigmaSchedule};
use super::sigmas::SigmaSpacing;
use super::Scheduler;
use crate::rng::Rng;
use crate::Result;

/// The x0 an Euler-type scheduler predicts at sigma `sigma` (float32, diffusers' order):
/// epsilon `x − σ·m`, v-prediction `m·(−σ/sqrt(σ²+1)) + x/(σ²+1)`, sample `m`.
/// `model_output` and `sample` are float32.
pub(super) fn euler_pred_original_sample(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - mul_f32(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let s2p1 = sigma * sigma + 1.0;
            (mul_f32(model_output, -sigma / s2p1.sqrt())? + div_f32(sample, s2p1)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// The Euler move `x + (x − x0)/σ · (σ_to − σ)` in float32 (diffusers' order).
fn euler_move(sample: &Tensor, pred_original_sample: &Tensor, sigma: f32, sigma_to: f32) -> Result<Tensor> {
    let derivative = div_f32(&(sample - pred_original_sample)?, sigma)?;
    Ok((sample + mul_f32(&derivative, sigma_to - sigma)?)?)
}

/// diffusers' `EulerDiscreteScheduler` set to N inference steps.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    schedule: NoiseSchedule,
    pub(super) sigmas: SigmaSchedule,
}

impl EulerDiscreteScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset, sigma spacing and bounds, `final_sigmas_type` and
    /// `timestep_type` are used).
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if cfg.interpolation_type != InterpolationType::Linear {
            return Err(cfg.err("interpolation_type", "only linear is supported, got log_linear"));
        }
        let schedule = NoiseSchedule::from_config(cfg)?;
        let layout = SigmaLayout {
            sigma_spacing: SigmaSpacing::from_config(cfg)?,
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
            final_sigmas_type: cfg.final_sigmas_type,
            timestep_type: cfg.timestep_type,
            ..SigmaLayout::plain(cfg, SchedulerKind::EulerDiscrete)
        };
        let sigmas = schedule.sigma_schedule(&layout, num_inference_steps)?;
        Ok(EulerDiscreteScheduler { schedule, sigmas })
    }

    /// The scheduler on `schedule` with a sigma layout (see [`NoiseSchedule::sigma_schedule`]).
    pub fn new(schedule: &NoiseSchedule, sigmas: SigmaSchedule) -> Self {
        EulerDiscreteScheduler {
            schedule: schedule.clone(),
            sigmas,
        }
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The N + 1 sigmas (the last one 0, or σ_min with `final_sigmas_type = "sigma_min"`).
    pub fn sigmas(&self) -> &[f64] {
        self.sigmas.sigmas()
    }

    /// The Euler move of `sample` (shapes checked by the caller) from the sigma of step
    /// `step_index` to `sigma_to`, in float32.
    pub(super) fn move_f32(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        sigma_to: f32,
    ) -> Result<Tensor> {
        let (sigma, _) = self.sigmas.sigma_pair(step_index)?;
        let x = sample.to_dtype(DType::F32)?;
        let mo = model_output.to_dtype(DType::F32)?;
        let x0 = euler_pred_original_sample(self.schedule.prediction_type(), &mo, &x, sigma)?;
        euler_move(&x, &x0, sigma, sigma_to)
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        self.sigmas.timesteps()
    }

    fn sigma_schedule(&self) -> Option<&SigmaSchedule> {
        Some(&self.sigmas)
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let (_, sigma_next) = self.sigmas.sigma_pair(step_index)?;
        let prev = self.move_f32(model_output, step_index, sample, sigma_next)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}

//! `EulerAncestralDiscreteScheduler`: ancestral sampling with Euler steps (k-diffusion's
//! `sample_euler_ancestral`, Karras et al. 2022, arXiv 2206.00364); diffusers'
//! `src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py`.
//!
//! Each step goes from σ to `σ_down = sqrt(σ_to² − σ_up²)` by an Euler move and adds fresh
//! noise `σ_up·z`, `σ_up = sqrt(σ_to²·(σ² − σ_to²)/σ²)`. Timesteps, sigmas (final sigma 0),
//! `init_noise_sigma` and `scale_model_input` are those of `EulerDiscreteScheduler`. The noise
//! comes from diffalign's [`Rng`] (so runs differ from torch's for the same seed);
//! [`EulerAncestralDiscreteScheduler::step_with_noise`] takes it explicitly. Sample prediction,
//! which diffusers does not implement here, uses `x0 = model_output`.

use candle_core::{DType, Tensor};

use super::config::{SchedulerConfig, SchedulerKind};
use super::euler_discrete::EulerDiscreteScheduler;
use super::noise_schedule::{check_step_shapes, mul_f32, NoiseSchedule, SigmaLayout, SigmaSchedule};
use super::Scheduler;
use crate::rng::Rng;
use crate::Result;

/// diffusers' `EulerAncestralDiscreteScheduler` set to N inference steps: the Euler scheduler's
/// timesteps and sigmas, with a noisy step.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    euler: EulerDiscreteScheduler,
}

impl EulerAncestralDiscreteScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing and offset are used; this class has no sigma options).
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(cfg)?;
        let sigmas = schedule.sigma_schedule(
            &SigmaLayout::plain(cfg, SchedulerKind::EulerAncestralDiscrete),
            num_inference_steps,
        )?;
        Ok(Self::new(&schedule, sigmas))
    }

    /// The scheduler on `schedule` with a sigma layout (see [`NoiseSchedule::sigma_schedule`]).
    pub fn new(schedule: &NoiseSchedule, sigmas: SigmaSchedule) -> Self {
        EulerAncestralDiscreteScheduler {
            euler: EulerDiscreteScheduler::new(schedule, sigmas),
        }
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        self.euler.schedule()
    }

    /// The N + 1 sigmas (the last one 0).
    pub fn sigmas(&self) -> &[f64] {
        self.euler.sigmas()
    }

    /// `(σ_up, σ_down)` of step `step_index` (float32, diffusers' order).
    pub fn sigma_up_down(&self, step_index: usize) -> Result<(f32, f32)> {
        let (from, to) = self.euler.sigmas.sigma_pair(step_index)?;
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        // Clamped at 0 where float32 rounding would make diffusers' square root NaN.
        let down = (to * to - up * up).max(0.0).sqrt();
        Ok((up, down))
    }

    /// One step with the ancestral noise `noise` (standard normal, the sample's shape).
    pub fn step_with_noise(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &Tensor,
    ) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        check_step_shapes(noise, sample)?;
        let (sigma_up, sigma_down) = self.sigma_up_down(step_index)?;
        let prev = self.euler.move_f32(model_output, step_index, sample, sigma_down)?;
        let prev = (prev + mul_f32(&noise.to_dtype(DType::F32)?, sigma_up)?)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        self.euler.timesteps()
    }

    fn sigma_schedule(&self) -> Option<&SigmaSchedule> {
        self.euler.sigma_schedule()
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.euler.sigmas.sigma_pair(step_index)?;
        let noise = rng.randn(sample.shape(), sample.device())?;
        self.step_with_noise(model_output, step_index, sample, &noise)
    }
}

//! Noise schedules and sampling step rules, ported from diffusers 0.42 with its numerics.
//!
//! - [`config`]: [`SchedulerConfig`] (a diffusers `scheduler_config.json`, read as Python's
//!   `json` writes it, `-Infinity` included) and the factory [`SchedulerConfig::build`];
//!   [`kind`]: [`SchedulerKind`] (the `--scheduler` choice) with per-class defaults.
//! - [`noise_schedule`]: [`NoiseSchedule`], computed once per config: betas, ᾱ, the per-sample
//!   training helpers (`add_noise`, `velocity`, `training_target`) and the inference timestep
//!   and sigma layouts.
//! - [`sigmas`]: Karras and exponential sigmas and the sigma → timestep map; `multistep`: the
//!   history and in-order check of multistep samplers and DPM-Solver / UniPC's grid.
//! - One step rule per file, named after the diffusers file: [`ddim`], [`ddim_inverse`],
//!   [`ddpm`], [`euler_discrete`], [`euler_ancestral_discrete`], [`pndm`], [`lms_discrete`],
//!   [`dpm_solver_multistep`], [`unipc_multistep`]. Multistep samplers keep state between
//!   steps, which must run in order from step 0.
//!
//! A sampling loop reads:
//! ```text
//! let mut sched = config.build(None, steps)?;
//! let mut latents = (init_noise * sched.init_noise_sigma())?;
//! for i in 0..sched.timesteps().len() {
//!     let t = sched.timesteps()[i];
//!     let input = sched.scale_model_input(&latents, i)?;
//!     let model_output = unet.forward(&input, t, &cond)?;
//!     latents = sched.step(&model_output, i, &latents, &mut rng)?;
//! }
//! ```

pub mod config;
pub mod ddim;
pub mod ddim_inverse;
pub mod ddpm;
pub mod dpm_solver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod kind;
pub mod lms_discrete;
mod multistep;
pub mod noise_schedule;
pub mod pndm;
mod python_json;
pub mod sigmas;
pub mod unipc_multistep;

pub use config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing, TimestepType, VarianceType,
};
pub use ddim::{DDIMScheduler, DdimMove, DdimSettings};
pub use ddim_inverse::DDIMInverseScheduler;
pub use ddpm::DDPMScheduler;
pub use dpm_solver_multistep::DPMSolverMultistepScheduler;
pub use euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
pub use euler_discrete::EulerDiscreteScheduler;
pub use kind::SchedulerKind;
pub use lms_discrete::LMSDiscreteScheduler;
pub use noise_schedule::{NoiseSchedule, SigmaLayout, SigmaSchedule, TimestepValues};
pub use pndm::PNDMScheduler;
pub use sigmas::SigmaSpacing;
pub use unipc_multistep::UniPCMultistepScheduler;

use candle_core::Tensor;

use crate::rng::Rng;
use crate::Result;

/// A sampler set to N inference steps, driven by step index.
pub trait Scheduler: Send + Sync {
    /// The timesteps the model is given, in sampling order (float values for Euler-type samplers).
    fn timesteps(&self) -> &[f64];

    /// The sigma layout of an Euler-type sampler, which sets the two methods below; `None` for
    /// DDIM-type samplers (initial scale 1, model input unchanged).
    fn sigma_schedule(&self) -> Option<&SigmaSchedule> {
        None
    }

    /// The scale of the initial latents: `latents = standard_normal · init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64 {
        self.sigma_schedule().map_or(1.0, SigmaSchedule::init_noise_sigma)
    }

    /// The model input for `sample` at step `step_index` (identity for DDIM,
    /// `sample / sqrt(σ² + 1)` for Euler-type samplers). Keeps the sample's shape and dtype.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        if let Some(sigmas) = self.sigma_schedule() {
            return sigmas.scale_model_input(sample, step_index);
        }
        let n = self.timesteps().len();
        if step_index >= n {
            return Err(noise_schedule::step_index_error(step_index, n));
        }
        Ok(sample.clone())
    }

    /// One step from the model output at `step_index` (same shape as `sample`) to the next
    /// sample; stochastic samplers draw their noise from `rng`.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, rng: &mut Rng) -> Result<Tensor>;
}

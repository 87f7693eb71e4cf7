//! `DDIMInverseScheduler`: DDIM run backwards, from a clean sample towards noise (DDIM
//! inversion, as in Null-text inversion, arXiv 2211.09794, and ReNoise, arXiv 2403.14602);
//! diffusers' `src/diffusers/schedulers/scheduling_ddim_inverse.py` (0.42 semantics).
//!
//! The step at timestep s moves the sample from noise level `s − T div N` to s: with
//! `ᾱ_from = ᾱ[min(s − T div N, T − 1)]`, or, below timestep 0, 1 when `set_alpha_to_one` else
//! ᾱ_0. Timesteps ascend (leading: `i·(T div N) + steps_offset`; trailing: diffusers' trailing
//! values reversed); linspace spacing is rejected, as in diffusers. [`DDIMInverseScheduler::step_to`]
//! takes the timestep itself, for ReNoise-style inversion loops that stop below a given t.

use candle_core::Tensor;

use super::config::{SchedulerConfig, SchedulerKind, TimestepSpacing};
use super::ddim::{DDIMScheduler, DdimMove, DdimSettings};
use super::noise_schedule::{step_index_error, NoiseSchedule};
use super::Scheduler;
use crate::rng::Rng;
use crate::{Error, Result};

/// diffusers' `DDIMInverseScheduler` set to N inversion steps: DDIM's grid (timesteps reversed,
/// its ᾱ below timestep 0 now the starting point) with the moves turned around.
#[derive(Debug, Clone)]
pub struct DDIMInverseScheduler {
    ddim: DDIMScheduler,
}

impl DDIMInverseScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset, `clip_sample` and `set_alpha_to_one` are used).
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(cfg)?;
        let spacing = cfg.timestep_spacing_for(SchedulerKind::DdimInverse);
        if spacing == TimestepSpacing::Linspace {
            return Err(cfg.err(
                "timestep_spacing",
                "DDIMInverseScheduler supports leading or trailing, got linspace",
            ));
        }
        let ddim = DDIMScheduler::new(&schedule, DdimSettings::from_config(cfg, spacing), num_inference_steps)?;
        Ok(Self::reversed(ddim))
    }

    /// The scheduler on `schedule` with explicit `settings` (spacing leading or trailing). For
    /// SmPO's ReNoise inversion: leading spacing, offset 1, `set_alpha_to_one` false, no clip.
    pub fn new(schedule: &NoiseSchedule, settings: DdimSettings, num_inference_steps: usize) -> Result<Self> {
        if settings.timestep_spacing == TimestepSpacing::Linspace {
            return Err(Error::input(
                "timestep_spacing",
                "DDIMInverseScheduler supports leading or trailing, got linspace",
            ));
        }
        Ok(Self::reversed(DDIMScheduler::new(
            schedule,
            settings,
            num_inference_steps,
        )?))
    }

    /// The inverse of `ddim` (eta 0): its timesteps ascending.
    fn reversed(mut ddim: DDIMScheduler) -> Self {
        ddim.timesteps.reverse();
        DDIMInverseScheduler { ddim }
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        self.ddim.schedule()
    }

    /// The move onto timestep `timestep` (any training timestep, not only scheduled ones).
    pub fn move_to(&self, timestep: usize) -> Result<DdimMove> {
        let schedule = &self.ddim.schedule;
        let t_train = schedule.num_train_timesteps();
        if timestep >= t_train {
            return Err(Error::input(
                "timestep",
                format!("expected a value in 0..{t_train}, got {timestep}"),
            ));
        }
        let ac = schedule.alphas_cumprod();
        let alpha_prod_t = match timestep.checked_sub(self.ddim.step_ratio) {
            Some(from) => ac[from.min(t_train - 1)],
            None => self.ddim.final_alpha_cumprod,
        };
        Ok(DdimMove {
            prediction_type: schedule.prediction_type(),
            alpha_prod_t,
            alpha_prod_to: ac[timestep],
            std_dev: 0.0,
            clip: self.ddim.clip,
        })
    }

    /// One inversion step onto `timestep` (from noise level `timestep − T div N`), diffusers'
    /// `DDIMInverseScheduler.step(model_output, timestep, sample)`.
    pub fn step_to(&self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor> {
        self.move_to(timestep)?.apply(model_output, sample, None)
    }
}

impl Scheduler for DDIMInverseScheduler {
    fn timesteps(&self) -> &[f64] {
        self.ddim.timesteps()
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        let n = self.ddim.timesteps.len();
        let t = *self
            .ddim
            .timesteps
            .get(step_index)
            .ok_or_else(|| step_index_error(step_index, n))?;
        self.step_to(model_output, t as usize, sample)
    }
}

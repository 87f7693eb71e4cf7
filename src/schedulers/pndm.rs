//! `PNDMScheduler`: pseudo numerical methods for diffusion models (Liu et al., 2022,
//! arXiv 2202.09778); diffusers' `src/diffusers/schedulers/scheduling_pndm.py`.
//!
//! With `skip_prk_steps: true` (what Stable Diffusion 1.x ships; crowsonkb's PLMS sampler), N
//! steps run N + 1 model evaluations at timesteps `t_0, t_1, t_1, t_2, ..., t_{N−1}` (the DDIM
//! grid with the second timestep repeated): the first two make a Heun-like start from t_0, then
//! linear multistep (Adams-Bashforth) combinations of up to four noise predictions feed the
//! transfer of formula (9). With `skip_prk_steps: false` (the class default, F-PNDM) the first
//! three moves are Runge-Kutta steps of four evaluations each at half steps (12 evaluations,
//! needs N >= 4), then PLMS continues with fourth order: N + 9 evaluations. Every move is by
//! T div N training timesteps, whatever the spacing, as in diffusers. Integer timesteps, no
//! input scaling, initial noise scale 1; epsilon and v-prediction.
//! Samples and model outputs are [B, C, H, W] (any shape, the same for both); the math runs in
//! float32 and the result has the sample's dtype.

use candle_core::{DType, Tensor};

use super::config::{PredictionType, SchedulerConfig, SchedulerKind};
use super::multistep::History;
use super::noise_schedule::{check_step_shapes, div_f32, mul_f32, NoiseSchedule, TimestepValues};
use super::Scheduler;
use crate::rng::Rng;
use crate::{Error, Result};

/// diffusers' `PNDMScheduler` (with `skip_prk_steps`) set to N inference steps.
#[derive(Debug, Clone)]
pub struct PNDMScheduler {
    schedule: NoiseSchedule,
    /// The Runge-Kutta timesteps (12, or none with `skip_prk_steps`), then the PLMS ones.
    timesteps: Vec<f64>,
    /// How many of the timesteps are Runge-Kutta evaluations.
    prk_steps: usize,
    /// T div N: the size of every move.
    step_ratio: usize,
    /// The Runge-Kutta sum of the current move (`cur_model_output`).
    rk_sum: Option<Tensor>,
    /// ᾱ below timestep 0: 1 with `set_alpha_to_one`, else ᾱ_0.
    final_alpha_cumprod: f64,
    /// The last four noise predictions (`ets`).
    ets: History,
    /// The sample the Heun-like start returns to (`cur_sample`).
    cur_sample: Option<Tensor>,
}

impl PNDMScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset and `set_alpha_to_one`, default false, are used).
    /// Sample prediction is an error, as in diffusers, and so are fewer than 4 steps without
    /// `skip_prk_steps` (diffusers fails on them).
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if !cfg.skip_prk_steps && (1..4).contains(&num_inference_steps) {
            return Err(cfg.err(
                "skip_prk_steps",
                format!(
                    "PNDM's Runge-Kutta warm-up needs at least 4 steps, got {num_inference_steps}; \
                     set skip_prk_steps to true for fewer"
                ),
            ));
        }
        if cfg.prediction_type == PredictionType::Sample {
            return Err(cfg.err("prediction_type", "PNDM supports epsilon or v_prediction, got sample"));
        }
        let schedule = NoiseSchedule::from_config(cfg)?;
        let n = num_inference_steps;
        let grid = schedule.inference_timesteps(
            cfg.timestep_spacing_for(SchedulerKind::Pndm),
            cfg.steps_offset,
            n,
            TimestepValues::Integer,
        )?;
        let (timesteps, prk_steps) = if cfg.skip_prk_steps {
            // diffusers: concatenate(ts[:-1], ts[-2:-1], ts[-1:]) on the ascending grid, reversed.
            let mut ts = vec![grid[0]];
            if n > 1 {
                ts.push(grid[1]);
                ts.extend_from_slice(&grid[1..]);
            }
            (ts, 0)
        } else {
            // diffusers: the top four timesteps d > c > b > a and their half steps give
            // d, c+h, c+h, c, c, b+h, b+h, b, b, a+h, a+h, a; PLMS then runs from a down.
            let half = (schedule.num_train_timesteps() / n / 2) as f64; // T div N div 2
            let mut ts = vec![grid[0]];
            for &t in &grid[1..4] {
                ts.extend([t + half, t + half, t, t]);
            }
            ts.pop();
            ts.extend_from_slice(&grid[3..]);
            (ts, 12)
        };
        let final_alpha_cumprod = if cfg.set_alpha_to_one_for(SchedulerKind::Pndm) {
            1.0
        } else {
            schedule.alphas_cumprod()[0]
        };
        Ok(PNDMScheduler {
            step_ratio: schedule.num_train_timesteps() / n,
            schedule,
            timesteps,
            prk_steps,
            rk_sum: None,
            final_alpha_cumprod,
            ets: History::new(4),
            cur_sample: None,
        })
    }

    /// ᾱ at training timestep `t` (`final_alpha_cumprod` below 0).
    fn alpha_prod(&self, t: i64) -> Result<f32> {
        let ac = self.schedule.alphas_cumprod();
        if t < 0 {
            return Ok(self.final_alpha_cumprod as f32);
        }
        ac.get(t as usize).map(|&a| a as f32).ok_or_else(|| {
            Error::input(
                "timestep",
                format!(
                    "PNDM moves to timestep {t}, outside the {} training timesteps",
                    ac.len()
                ),
            )
        })
    }

    /// Formula (9) of the paper: `sample` (f32) at timestep `t` to `prev_t` given the noise
    /// prediction `eps` (f32; a velocity for v-prediction), in diffusers' float32 order.
    fn transfer(&self, sample: &Tensor, t: i64, prev_t: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha_prod(t)?;
        let a_prev = self.alpha_prod(prev_t)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.schedule.prediction_type() {
            PredictionType::VPrediction => (mul_f32(eps, a_t.sqrt())? + mul_f32(sample, b_t.sqrt())?)?,
            _ => eps.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let correction = div_f32(&mul_f32(&eps, a_prev - a_t)?, denom)?;
        Ok((mul_f32(sample, sample_coeff)? - correction)?)
    }

    /// A Runge-Kutta evaluation (diffusers' `step_prk`): each move from the first timestep `t`
    /// of a group of four combines the slopes at t, twice at t − h/2 and at t − h with weights
    /// 1/6, 1/3, 1/3, 1/6, every evaluation moving from the group's start sample.
    fn step_prk(&mut self, mo: Tensor, step_index: usize, x: &Tensor) -> Result<Tensor> {
        let half = (self.step_ratio / 2) as i64;
        let t_here = self.timesteps[step_index] as i64;
        let prev_t = t_here - if step_index % 2 == 1 { 0 } else { half };
        let t_start = self.timesteps[step_index / 4 * 4] as i64;
        let weighted = |w: f64| mul_f32(&mo, w as f32);
        let eps = match step_index % 4 {
            0 => {
                self.rk_sum = Some(weighted(1.0 / 6.0)?);
                self.ets.push(mo.clone());
                self.cur_sample = Some(x.clone());
                mo.clone()
            }
            1 | 2 => {
                let sum = self.rk_sum.take().expect("a group of four starts with a slope");
                self.rk_sum = Some((sum + weighted(1.0 / 3.0)?)?);
                mo.clone()
            }
            _ => {
                let sum = self.rk_sum.take().expect("a group of four starts with a slope");
                (sum + weighted(1.0 / 6.0)?)?
            }
        };
        let start = self.cur_sample.clone().expect("a group of four keeps its start sample");
        self.transfer(&start, t_start, prev_t, &eps)
    }

    /// The Adams-Bashforth combination of the held noise predictions (newest first: e1..e4).
    fn combined_eps(&self) -> Result<Tensor> {
        let e = |k| self.ets.back(k);
        Ok(match self.ets.len() {
            1 => e(0).clone(),
            2 => ((mul_f32(e(0), 3.0)? - e(1))? * 0.5)?,
            3 => div_f32(
                &((mul_f32(e(0), 23.0)? - mul_f32(e(1), 16.0)?)? + mul_f32(e(2), 5.0)?)?,
                12.0,
            )?,
            _ => {
                let sum =
                    (((mul_f32(e(0), 55.0)? - mul_f32(e(1), 59.0)?)? + mul_f32(e(2), 37.0)?)? - mul_f32(e(3), 9.0)?)?;
                mul_f32(&sum, (1.0f64 / 24.0) as f32)?
            }
        })
    }
}

impl Scheduler for PNDMScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        self.ets.begin_step(step_index, self.timesteps.len())?;
        let out_dtype = sample.dtype();
        let mo = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let ratio = self.step_ratio as i64;
        let t_here = self.timesteps[step_index] as i64;
        let prev = if step_index < self.prk_steps {
            self.step_prk(mo, step_index, &x)?
        } else if step_index == 1 {
            // The second evaluation at t_1 redoes the first move t_0 → t_1 with the mean of both
            // predictions, from the sample the first step started at.
            let eps = ((&mo + self.ets.back(0))? * 0.5)?;
            let start = self.cur_sample.take().expect("step 0 keeps its sample for step 1");
            self.transfer(&start, t_here + ratio, t_here, &eps)?
        } else {
            if step_index == 0 {
                self.cur_sample = Some(x.clone());
            }
            self.ets.push(mo);
            let eps = self.combined_eps()?;
            self.transfer(&x, t_here, t_here - ratio, &eps)?
        };
        Ok(prev.to_dtype(out_dtype)?)
    }
}

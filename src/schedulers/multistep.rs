//! What the multistep samplers share: the previous model outputs they combine and the check
//! that steps run in order (PNDM, DPM-Solver, LMS, UniPC; diffusers keeps that state inside
//! the scheduler between calls), and the timestep grid and λ arithmetic of DPM-Solver and UniPC.

use candle_core::Tensor;

use super::config::{PredictionType, TimestepSpacing};
use super::noise_schedule::{div_f32, mul_f32, step_index_error, NoiseSchedule, SigmaLayout};
use super::sigmas::{log_sigmas, np_arange_down, np_linspace, sigma_to_t, SigmaSpacing};
use crate::{Error, Result};

/// The last `capacity` converted model outputs (oldest first) and the step expected next.
/// Step 0 starts a fresh run: calling it again restarts the sampler.
#[derive(Debug, Clone)]
pub(super) struct History {
    outputs: Vec<Tensor>,
    capacity: usize,
    next_step: usize,
}

impl History {
    /// An empty history keeping up to `capacity` outputs.
    pub(super) fn new(capacity: usize) -> Self {
        History {
            outputs: Vec::with_capacity(capacity),
            capacity,
            next_step: 0,
        }
    }

    /// Checks that `step_index` (of `n` steps) is the step due (clearing the history at step 0)
    /// and marks the next one due.
    pub(super) fn begin_step(&mut self, step_index: usize, n: usize) -> Result<()> {
        if step_index >= n {
            return Err(step_index_error(step_index, n));
        }
        if step_index == 0 {
            self.outputs.clear();
        } else if step_index != self.next_step {
            return Err(Error::input(
                "step_index",
                format!(
                    "a multistep sampler runs its steps in order from 0: expected step {}, got {step_index}",
                    self.next_step
                ),
            ));
        }
        self.next_step = step_index + 1;
        Ok(())
    }

    /// Appends `output`, dropping the oldest beyond the capacity.
    pub(super) fn push(&mut self, output: Tensor) {
        if self.outputs.len() == self.capacity {
            self.outputs.remove(0);
        }
        self.outputs.push(output);
    }

    /// The `k`-th most recent output (0 = the newest).
    pub(super) fn back(&self, k: usize) -> &Tensor {
        &self.outputs[self.outputs.len() - 1 - k]
    }

    /// How many outputs are held.
    pub(super) fn len(&self) -> usize {
        self.outputs.len()
    }
}

/// The timesteps and sigmas of DPM-Solver and UniPC for N steps.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MultistepGrid {
    /// Integer timesteps, in sampling order.
    pub timesteps: Vec<f64>,
    /// One sigma per timestep (float32 values), then the final sigma.
    pub sigmas: Vec<f64>,
}

impl MultistepGrid {
    /// diffusers' `set_timesteps` of `DPMSolverMultistepScheduler` / `UniPCMultistepScheduler`:
    /// - linspace: `linspace(0, L − 1, N + 1)` rounded, reversed, without the last (0);
    /// - leading: `i·(L div (N + 1)) + steps_offset` for i = N down to 1;
    /// - trailing: `round(L − i·T/N) − 1` (at most N values);
    ///
    /// with L = `last_timestep` (T unless DPM-Solver clips λ). Sigmas are the training sigmas
    /// there; Karras / exponential sigmas run between the smallest and largest training sigma
    /// instead, their timesteps from [`sigma_to_t`], rounded for Karras when `round_karras`
    /// and otherwise truncated to integers as diffusers' int64 cast does.
    pub(super) fn new(
        schedule: &NoiseSchedule,
        layout: &SigmaLayout,
        n: usize,
        last_timestep: usize,
        round_karras: bool,
    ) -> Result<Self> {
        let t_train = schedule.num_train_timesteps();
        if n == 0 || n > t_train {
            return Err(Error::input(
                "num_inference_steps",
                format!("must be in 1..={t_train} (num_train_timesteps), got {n}"),
            ));
        }
        let last = last_timestep as f64;
        let grid: Vec<f64> = match layout.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut ys: Vec<f64> = np_linspace(0.0, last - 1.0, n + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                ys.remove(0);
                ys.reverse();
                ys
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + layout.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let step = t_train as f64 / n as f64;
                let count = ((last / step).ceil() as usize).min(n);
                np_arange_down(last, step, count)
                    .into_iter()
                    .map(|v| v.round_ties_even() - 1.0)
                    .collect()
            }
        };
        if let Some(&bad) = grid.iter().find(|&&t| t < 0.0 || t >= t_train as f64) {
            return Err(Error::input(
                "steps_offset",
                format!("timestep {bad} for {n} steps is outside the {t_train} training timesteps"),
            ));
        }
        let train = schedule.train_sigmas();
        let (timesteps, mut sigmas) = match layout.sigma_spacing.sigmas(train[0], train[t_train - 1], n) {
            None => (
                grid.clone(),
                grid.iter().map(|&t| train[t as usize]).collect::<Vec<_>>(),
            ),
            Some(sigmas) => {
                let logs = log_sigmas(&train);
                let karras = layout.sigma_spacing == SigmaSpacing::Karras;
                let ts = sigmas
                    .iter()
                    .map(|&s| {
                        let t = sigma_to_t(s, &logs);
                        if karras && round_karras {
                            t.round_ties_even()
                        } else {
                            t.trunc()
                        }
                    })
                    .collect();
                (ts, sigmas)
            }
        };
        sigmas.push(schedule.final_sigma(layout.final_sigmas_type));
        Ok(MultistepGrid {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32 as f64).collect(),
        })
    }
}

/// `(α_t, σ_t)` of the variance-preserving sample at sigma `sigma` (float32, diffusers'
/// `_sigma_to_alpha_sigma_t`): `α = 1/sqrt(σ² + 1)`, `σ_t = σ·α`.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `λ = ln α_t − ln σ_t` at sigma `sigma` (float32; +∞ at σ = 0).
pub(super) fn lambda(sigma: f32) -> f32 {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    alpha.ln() - sigma_t.ln()
}

/// The data prediction x0 of a variance-preserving `sample` at sigma `sigma` from the model
/// output (float32 tensors, diffusers' order): epsilon `(x − σ_t·m)/α_t`, sample `m`,
/// v-prediction `α_t·x − σ_t·m`.
pub(super) fn data_prediction(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    Ok(match prediction_type {
        PredictionType::Epsilon => div_f32(&(sample - mul_f32(model_output, sigma_t)?)?, alpha_t)?,
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => (mul_f32(sample, alpha_t)? - mul_f32(model_output, sigma_t)?)?,
    })
}

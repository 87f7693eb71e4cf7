//! `DPMSolverMultistepScheduler`: multistep DPM-Solver++ of orders 1 to 3 and its stochastic
//! form SDE-DPM-Solver++ (Lu et al., 2022, arXiv 2211.01095; the ODE solver of arXiv
//! 2206.00927); diffusers' `src/diffusers/schedulers/scheduling_dpmsolver_multistep.py`.
//!
//! Each step converts the model output to a data prediction x0 and combines it with the previous
//! ones (midpoint or Heun rule at second order) in λ = ln(α/σ). The first steps, and with
//! `lower_order_final` the last ones of runs under 15 steps, lower the order; a final sigma of 0
//! makes the last step first order. Timesteps are integers (see [`MultistepGrid`]), Karras or
//! exponential sigmas optional; samples are variance preserving (no input scaling, initial
//! noise scale 1). The SDE variant draws `z` from diffalign's [`Rng`];
//! [`DPMSolverMultistepScheduler::step_with_noise`] takes it explicitly. Not supported (an
//! error naming the key): the deprecated `dpmsolver` / `sde-dpmsolver` variants, thresholding,
//! learned variances, Lu lambdas, beta and flow sigmas. Samples and model outputs are
//! [B, C, H, W] (any shape, the same for both); the math runs in float32 and the result has the
//! model output's dtype, as in diffusers.

use candle_core::{DType, Tensor};

use super::config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, SchedulerConfig, SchedulerKind, SolverType, VarianceType,
};
use super::multistep::{alpha_sigma, data_prediction, lambda, History, MultistepGrid};
use super::noise_schedule::{check_step_shapes, mul_f32, NoiseSchedule, SigmaLayout};
use super::sigmas::{reject_true, SigmaSpacing};
use super::Scheduler;
use crate::rng::Rng;
use crate::{Error, Result};

/// diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++ or SDE-DPM-Solver++) set to N steps.
#[derive(Debug, Clone)]
pub struct DPMSolverMultistepScheduler {
    schedule: NoiseSchedule,
    grid: MultistepGrid,
    solver_order: usize,
    /// SDE-DPM-Solver++ (adds noise each step) rather than DPM-Solver++.
    sde: bool,
    /// Heun's rule at second order (midpoint otherwise).
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    /// The final sigma is 0 (the last step is then first order).
    final_sigma_zero: bool,
    /// The data predictions of the last `solver_order` steps.
    outputs: History,
}

impl DPMSolverMultistepScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset, `solver_order`, `algorithm_type`, `solver_type`,
    /// `lower_order_final`, `euler_at_final`, sigma spacing, `final_sigmas_type` and
    /// `lambda_min_clipped` are used).
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let sde = match cfg.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis => false,
            AlgorithmType::SdeDpmSolverPlusPlus => true,
            other => {
                return Err(cfg.err(
                    "algorithm_type",
                    format!("the deprecated {other:?} is not supported; use dpmsolver++ or sde-dpmsolver++"),
                ))
            }
        };
        if !(1..=3).contains(&cfg.solver_order) {
            return Err(cfg.err("solver_order", format!("must be 1, 2 or 3, got {}", cfg.solver_order)));
        }
        if cfg.thresholding {
            return Err(cfg.err("thresholding", "dynamic thresholding is not supported, got true"));
        }
        if let Some(v @ (VarianceType::Learned | VarianceType::LearnedRange)) = cfg.variance_type {
            return Err(cfg.err(
                "variance_type",
                format!("learned variances are not supported, got {v:?}"),
            ));
        }
        reject_true(
            cfg,
            &[
                ("use_lu_lambdas", cfg.use_lu_lambdas),
                ("use_dynamic_shifting", cfg.use_dynamic_shifting),
            ],
        )?;
        let schedule = NoiseSchedule::from_config(cfg)?;
        let layout = SigmaLayout {
            sigma_spacing: SigmaSpacing::from_config(cfg)?,
            final_sigmas_type: cfg.final_sigmas_type,
            ..SigmaLayout::plain(cfg, SchedulerKind::DpmSolverMultistep)
        };
        let last_timestep = schedule.num_train_timesteps() - clipped_timesteps(&schedule, cfg.lambda_min_clipped);
        let round_karras = cfg.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let grid = MultistepGrid::new(&schedule, &layout, num_inference_steps, last_timestep, round_karras)?;
        Ok(DPMSolverMultistepScheduler {
            schedule,
            grid,
            solver_order: cfg.solver_order,
            sde,
            heun: cfg.solver_type == Some(SolverType::Heun),
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigma_zero: cfg.final_sigmas_type == FinalSigmasType::Zero,
            outputs: History::new(cfg.solver_order),
        })
    }

    /// The N + 1 sigmas (float32 values): one per step, then the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.grid.sigmas
    }

    /// Whether the steps add noise (SDE-DPM-Solver++).
    pub fn is_stochastic(&self) -> bool {
        self.sde
    }

    /// The order step `step_index` runs at (diffusers' warm-up and `lower_order_final` rules).
    fn order_at(&self, step_index: usize) -> usize {
        let n = self.grid.timesteps.len();
        let short = self.lower_order_final && n < 15;
        let lower_final = step_index == n - 1 && (self.euler_at_final || short || self.final_sigma_zero);
        let lower_second = step_index + 2 == n && short;
        // Outputs of earlier steps available: diffusers' `lower_order_nums`.
        let earlier = step_index.min(self.solver_order);
        if self.solver_order == 1 || earlier < 1 || lower_final {
            1
        } else if self.solver_order == 2 || earlier < 2 || lower_second {
            2
        } else {
            3
        }
    }

    /// One step with explicit SDE noise (standard normal, the sample's shape; required for
    /// SDE-DPM-Solver++, ignored otherwise). Steps run in order from 0.
    pub fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let noise = match (self.sde, noise) {
            (true, Some(z)) => {
                check_step_shapes(z, sample)?;
                Some(z.to_dtype(DType::F32)?)
            }
            (true, None) => return Err(Error::input("noise", "SDE-DPM-Solver++ needs noise for every step")),
            (false, _) => None,
        };
        self.outputs.begin_step(step_index, self.grid.timesteps.len())?;
        let x = sample.to_dtype(DType::F32)?;
        let sigmas: Vec<f32> = self.grid.sigmas.iter().map(|&s| s as f32).collect();
        let x0 = data_prediction(
            self.schedule.prediction_type(),
            &model_output.to_dtype(DType::F32)?,
            &x,
            sigmas[step_index],
        )?;
        self.outputs.push(x0);
        let order = self.order_at(step_index);
        let i = step_index;
        let (alpha_t, sigma_t) = alpha_sigma(sigmas[i + 1]);
        let (_, sigma_s0) = alpha_sigma(sigmas[i]);
        let h = lambda(sigmas[i + 1]) - lambda(sigmas[i]);
        let m0 = self.outputs.back(0);
        // D1 and D2: the divided differences of the data predictions (zero below their order).
        let (d1, d2) = match order {
            1 => (None, None),
            2 => {
                let r0 = (lambda(sigmas[i]) - lambda(sigmas[i - 1])) / h;
                (Some(mul_f32(&(m0 - self.outputs.back(1))?, 1.0 / r0)?), None)
            }
            _ => {
                let (l0, l1, l2) = (lambda(sigmas[i]), lambda(sigmas[i - 1]), lambda(sigmas[i - 2]));
                let (r0, r1) = ((l0 - l1) / h, (l1 - l2) / h);
                let (m1, m2) = (self.outputs.back(1), self.outputs.back(2));
                let d1_0 = mul_f32(&(m0 - m1)?, 1.0 / r0)?;
                let d1_1 = mul_f32(&(m1 - m2)?, 1.0 / r1)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + mul_f32(&diff, r0 / (r0 + r1))?)?;
                (Some(d1), Some(mul_f32(&diff, 1.0 / (r0 + r1))?))
            }
        };
        let prev = if self.sde {
            let e2 = (-2.0 * h).exp();
            let mut x_t = (mul_f32(&x, sigma_t / sigma_s0 * (-h).exp())? + mul_f32(m0, alpha_t * (1.0 - e2))?)?;
            if let Some(d1) = &d1 {
                let c1 = match (order, self.heun) {
                    (2, false) => 0.5 * (alpha_t * (1.0 - e2)),
                    _ => alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0),
                };
                x_t = (x_t + mul_f32(d1, c1)?)?;
            }
            if let Some(d2) = &d2 {
                let c2 = alpha_t * ((1.0 - e2 - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5);
                x_t = (x_t + mul_f32(d2, c2)?)?;
            }
            let z = noise.expect("checked above: SDE steps have noise");
            (x_t + mul_f32(&z, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?)?
        } else {
            let em1 = (-h).exp() - 1.0;
            let mut x_t = (mul_f32(&x, sigma_t / sigma_s0)? - mul_f32(m0, alpha_t * em1)?)?;
            if let Some(d1) = &d1 {
                x_t = match (order, self.heun) {
                    (2, false) => (x_t - mul_f32(d1, 0.5 * (alpha_t * em1))?)?,
                    _ => (x_t + mul_f32(d1, alpha_t * (em1 / h + 1.0))?)?,
                };
            }
            if let Some(d2) = &d2 {
                x_t = (x_t - mul_f32(d2, alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5))?)?;
            }
            x_t
        };
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}

/// diffusers' `clipped_idx`: how many training timesteps have λ below `lambda_min_clipped`
/// (`searchsorted` on the ascending λ of the flipped schedule).
fn clipped_timesteps(schedule: &NoiseSchedule, lambda_min_clipped: f64) -> usize {
    let clip = lambda_min_clipped as f32;
    schedule
        .alphas_cumprod()
        .iter()
        .map(|&a| {
            let a = a as f32;
            a.sqrt().ln() - (1.0 - a).sqrt().ln()
        })
        .filter(|&l| l < clip)
        .count()
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.grid.timesteps
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let noise = if self.sde {
            Some(rng.randn(sample.shape(), sample.device())?)
        } else {
            None
        };
        self.step_with_noise(model_output, step_index, sample, noise.as_ref())
    }
}

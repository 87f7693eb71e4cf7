//! `UniPCMultistepScheduler`: the unified predictor-corrector of Zhao et al. (2023, arXiv
//! 2302.04867), UniP-p with UniC-p on the data prediction; diffusers'
//! `src/diffusers/schedulers/scheduling_unipc_multistep.py`.
//!
//! Each step first corrects the sample the previous step predicted, with the model output just
//! computed there (UniC; skipped for the steps in `disable_corrector`), then predicts the next
//! sample from up to `solver_order` data predictions (UniP), both with the B(h) of
//! `solver_type` (bh1: h, bh2: e^h − 1, the default). The order warms up over the first steps
//! and, with `lower_order_final`, falls to what the remaining steps allow. The timestep grid and
//! sigmas are DPM-Solver's ([`MultistepGrid`]); no input scaling, initial noise scale 1. Not
//! supported (an error naming the key): `predict_x0: false`, thresholding, beta and flow
//! sigmas, dynamic shifting. Samples and model outputs are [B, C, H, W] (any shape, the same for
//! both); the math runs in float32 and the result has the sample's dtype.

use candle_core::{DType, Tensor};

use super::config::{SchedulerConfig, SchedulerKind, SolverType};
use super::multistep::{alpha_sigma, data_prediction, lambda, History, MultistepGrid};
use super::noise_schedule::{check_step_shapes, div_f32, mul_f32, NoiseSchedule, SigmaLayout};
use super::sigmas::{reject_true, SigmaSpacing};
use super::Scheduler;
use crate::rng::Rng;
use crate::{Error, Result};

/// diffusers' `UniPCMultistepScheduler` set to N inference steps.
#[derive(Debug, Clone)]
pub struct UniPCMultistepScheduler {
    schedule: NoiseSchedule,
    grid: MultistepGrid,
    solver_order: usize,
    /// B(h) = e^h − 1 (bh2) rather than h (bh1).
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// The data predictions of the last `solver_order` steps.
    outputs: History,
    /// The sample the last predictor started from, and its order.
    last: Option<(Tensor, usize)>,
}

/// The float32 quantities of one UniP or UniC update between sigma indices `s0` and `t`.
struct Update {
    alpha_t: f32,
    /// σ_t / σ_s0.
    sigma_ratio: f32,
    h_phi_1: f32,
    b_h: f32,
    /// (λ_{s_k} − λ_s0)/h for the earlier outputs, then 1.
    rks: Vec<f32>,
    /// The right-hand side of the order conditions.
    b: Vec<f32>,
}

impl UniPCMultistepScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset, `solver_order`, `solver_type`, `lower_order_final`,
    /// `disable_corrector`, sigma spacing and `final_sigmas_type` are used).
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if !(1..=3).contains(&cfg.solver_order) {
            return Err(cfg.err("solver_order", format!("must be 1, 2 or 3, got {}", cfg.solver_order)));
        }
        if !cfg.predict_x0 {
            return Err(cfg.err("predict_x0", "only the data-prediction form is supported, got false"));
        }
        if cfg.thresholding {
            return Err(cfg.err("thresholding", "dynamic thresholding is not supported, got true"));
        }
        reject_true(cfg, &[("use_dynamic_shifting", cfg.use_dynamic_shifting)])?;
        let bh2 = match cfg.solver_type {
            None | Some(SolverType::Bh2) => true,
            Some(SolverType::Bh1) => false,
            Some(other) => {
                return Err(cfg.err("solver_type", format!("UniPC supports bh1 or bh2, got {other:?}")));
            }
        };
        let schedule = NoiseSchedule::from_config(cfg)?;
        let layout = SigmaLayout {
            sigma_spacing: SigmaSpacing::from_config(cfg)?,
            final_sigmas_type: cfg.final_sigmas_type,
            ..SigmaLayout::plain(cfg, SchedulerKind::UniPcMultistep)
        };
        let t_train = schedule.num_train_timesteps();
        let grid = MultistepGrid::new(&schedule, &layout, num_inference_steps, t_train, true)?;
        Ok(UniPCMultistepScheduler {
            schedule,
            grid,
            solver_order: cfg.solver_order,
            bh2,
            lower_order_final: cfg.lower_order_final,
            disable_corrector: cfg.disable_corrector.clone(),
            outputs: History::new(cfg.solver_order),
            last: None,
        })
    }

    /// The N + 1 sigmas (float32 values): one per step, then the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.grid.sigmas
    }

    fn sigma(&self, i: usize) -> f32 {
        self.grid.sigmas[i] as f32
    }

    /// The coefficients of an update of order `order` from sigma index `s0` to `t`; the held
    /// output `k` steps back came from sigma index `s0 − k`.
    fn update(&self, s0: usize, t: usize, order: usize) -> Update {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(t));
        let (_, sigma_s0) = alpha_sigma(self.sigma(s0));
        let lambda_s0 = lambda(self.sigma(s0));
        let h = lambda(self.sigma(t)) - lambda_s0;
        let mut rks: Vec<f32> = (1..order)
            .map(|k| (lambda(self.sigma(s0 - k)) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u64;
        let mut b = Vec::with_capacity(order);
        for k in 1..=order {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= k as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Update {
            alpha_t,
            sigma_ratio: sigma_t / sigma_s0,
            h_phi_1,
            b_h,
            rks,
            b,
        }
    }

    /// `Σ_k rhos[k]·(m_{k+1} − m0)/rks[k]` over the held outputs `m_j = outputs.back(j)`
    /// (`None` without terms).
    fn weighted_differences(&self, u: &Update, rhos: &[f32], m0: &Tensor) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (k, &rho) in rhos.iter().enumerate() {
            let d = div_f32(&(self.outputs.back(k + 1) - m0)?, u.rks[k])?;
            let term = mul_f32(&d, rho)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    /// UniP: the sample at step `i + 1` from `x` at step `i` (the newest output is step i's).
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let u = self.update(i, i + 1, order);
        let m0 = self.outputs.back(0);
        let base = (mul_f32(x, u.sigma_ratio)? - mul_f32(m0, u.alpha_t * u.h_phi_1)?)?;
        let rhos: Vec<f32> = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => solve(&order_matrix(&u.rks[..order - 1], order - 1), &u.b[..order - 1])?,
        };
        match self.weighted_differences(&u, &rhos, m0)? {
            Some(res) => Ok((base - mul_f32(&res, u.alpha_t * u.b_h)?)?),
            None => Ok(base),
        }
    }

    /// UniC: the sample at step `i` recomputed from `last`, the sample step i − 1 predicted from,
    /// with the data prediction `model_t` at step i (the newest held output is still step
    /// i − 1's); the predicted sample itself is not used, as in diffusers.
    fn correct(&self, model_t: &Tensor, last: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let u = self.update(i - 1, i, order);
        let m0 = self.outputs.back(0);
        let base = (mul_f32(last, u.sigma_ratio)? - mul_f32(m0, u.alpha_t * u.h_phi_1)?)?;
        let rhos = match order {
            1 => vec![0.5],
            _ => solve(&order_matrix(&u.rks, order), &u.b)?,
        };
        let corr = mul_f32(&(model_t - m0)?, rhos[order - 1])?;
        let corr = match self.weighted_differences(&u, &rhos[..order - 1], m0)? {
            Some(res) => (res + corr)?,
            None => corr,
        };
        Ok((base - mul_f32(&corr, u.alpha_t * u.b_h)?)?)
    }
}

/// The order-condition matrix `R[j][k] = rks[k]^j` (rows j < n).
fn order_matrix(rks: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|j| rks[..n].iter().map(|&r| (0..j).fold(1.0f32, |p, _| p * r)).collect())
        .collect()
}

/// Solves `a·x = b` (n <= 3) in float32 as reference LAPACK's `sgesv` behind
/// `torch.linalg.solve` does: LU with partial pivoting, multipliers scaled by the pivot's
/// reciprocal, then column-oriented substitution.
fn solve(a: &[Vec<f32>], b: &[f32]) -> Result<Vec<f32>> {
    let n = b.len();
    let mut m: Vec<Vec<f32>> = a.to_vec();
    let mut x = b.to_vec();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()).then(j.cmp(&i)))
            .expect("col < n");
        if m[pivot][col] == 0.0 || !m[pivot][col].is_finite() {
            return Err(Error::input(
                "UniPC",
                "singular order conditions (a final sigma of 0 with lower_order_final off?)",
            ));
        }
        m.swap(col, pivot);
        x.swap(col, pivot);
        let recip = 1.0 / m[col][col];
        let (upper, lower) = m.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let l = row[col] * recip;
            for (a, &p) in row.iter_mut().zip(pivot_row).skip(col + 1) {
                *a -= l * p;
            }
            x[col + 1 + offset] -= l * x[col];
        }
    }
    for k in (0..n).rev() {
        x[k] /= m[k][k];
        for i in 0..k {
            x[i] -= x[k] * m[i][k];
        }
    }
    Ok(x)
}

impl Scheduler for UniPCMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.grid.timesteps
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let n = self.grid.timesteps.len();
        self.outputs.begin_step(step_index, n)?;
        if step_index == 0 {
            self.last = None;
        }
        let i = step_index;
        let x = sample.to_dtype(DType::F32)?;
        let m = data_prediction(
            self.schedule.prediction_type(),
            &model_output.to_dtype(DType::F32)?,
            &x,
            self.sigma(i),
        )?;
        let x = match self.last.take() {
            Some((last, order)) if !self.disable_corrector.contains(&(i - 1)) => self.correct(&m, &last, i, order)?,
            _ => x,
        };
        self.outputs.push(m);
        let order = if self.lower_order_final {
            self.solver_order.min(n - i)
        } else {
            self.solver_order
        };
        // Warm-up: no more earlier outputs than steps taken (diffusers' `lower_order_nums`).
        let order = order.min(i.min(self.solver_order) + 1);
        let prev = self.predict(&x, i, order)?;
        self.last = Some((x, order));
        Ok(prev.to_dtype(sample.dtype())?)
    }
}

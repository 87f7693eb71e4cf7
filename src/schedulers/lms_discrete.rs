//! `LMSDiscreteScheduler`: the linear multistep method of order 4 on the probability-flow ODE in
//! sigma space (k-diffusion's `sample_lms`, Karras et al., 2022, arXiv 2206.00364); diffusers'
//! `src/diffusers/schedulers/scheduling_lms_discrete.py`.
//!
//! Timesteps, sigmas (final 0; Karras or exponential optional), `init_noise_sigma` and
//! `scale_model_input` are those of the Euler scheduler. Step i moves the sample by
//! `Σ_k c_k·d_{i−k}` over the last min(i + 1, 4) derivatives `d = (x − x0)/σ`, with
//! `c_k = ∫_{σ_i}^{σ_{i+1}} Π_{j≠k} (τ − σ_{i−j})/(σ_{i−k} − σ_{i−j}) dτ`, the Lagrange basis
//! polynomials integrated over the step. diffusers integrates them numerically with SciPy's
//! `quad`; they are polynomials of degree at most 3, integrated here exactly by 4-point
//! Gauss-Legendre quadrature in f64. Samples and model outputs are [B, C, H, W] (any shape, the
//! same for both); the math runs in float32 and the result has the sample's dtype.

use candle_core::{DType, Tensor};

use super::config::{SchedulerConfig, SchedulerKind};
use super::euler_discrete::euler_pred_original_sample;
use super::multistep::History;
use super::noise_schedule::{check_step_shapes, div_f32, mul_f32, NoiseSchedule, SigmaLayout, SigmaSchedule};
use super::sigmas::SigmaSpacing;
use super::Scheduler;
use crate::rng::Rng;
use crate::Result;

/// The order of the multistep method (diffusers' `step(order=4)` default).
const ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler` set to N inference steps.
#[derive(Debug, Clone)]
pub struct LMSDiscreteScheduler {
    schedule: NoiseSchedule,
    sigmas: SigmaSchedule,
    /// The derivatives of the last `ORDER` steps.
    derivatives: History,
}

impl LMSDiscreteScheduler {
    /// The scheduler for `num_inference_steps` steps from a config (any class: its beta schedule,
    /// prediction type, spacing, offset and sigma spacing are used; this class has no sigma bounds
    /// or final sigma options).
    pub fn from_config(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(cfg)?;
        let layout = SigmaLayout {
            sigma_spacing: SigmaSpacing::from_config(cfg)?,
            ..SigmaLayout::plain(cfg, SchedulerKind::LmsDiscrete)
        };
        let sigmas = schedule.sigma_schedule(&layout, num_inference_steps)?;
        Ok(LMSDiscreteScheduler {
            schedule,
            sigmas,
            derivatives: History::new(ORDER),
        })
    }

    /// The N + 1 sigmas (the last one 0).
    pub fn sigmas(&self) -> &[f64] {
        self.sigmas.sigmas()
    }

    /// The coefficient of the derivative `current_order` steps back for step `step_index` with a
    /// method of order `order` (diffusers' `get_lms_coefficient`).
    pub fn lms_coefficient(&self, order: usize, step_index: usize, current_order: usize) -> f64 {
        let s = |k: usize| f64::from(self.sigmas.sigmas()[step_index - k] as f32);
        let basis = |tau: f64| -> f64 {
            (0..order)
                .filter(|&k| k != current_order)
                .map(|k| (tau - s(k)) / (s(current_order) - s(k)))
                .product()
        };
        let (a, b) = (s(0), f64::from(self.sigmas.sigmas()[step_index + 1] as f32));
        gauss_legendre_4(basis, a, b)
    }
}

/// `∫_a^b f` by 4-point Gauss-Legendre quadrature: exact for polynomials of degree <= 7.
fn gauss_legendre_4(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    // Nodes ±sqrt(3/7 ∓ 2/7·sqrt(6/5)), weights (18 ± sqrt(30))/36.
    let r = (6.0f64 / 5.0).sqrt();
    let inner = (3.0 / 7.0 - 2.0 / 7.0 * r).sqrt();
    let outer = (3.0 / 7.0 + 2.0 / 7.0 * r).sqrt();
    let w_inner = (18.0 + 30f64.sqrt()) / 36.0;
    let w_outer = (18.0 - 30f64.sqrt()) / 36.0;
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let sum: f64 = [(-outer, w_outer), (-inner, w_inner), (inner, w_inner), (outer, w_outer)]
        .iter()
        .map(|&(x, w)| w * f(mid + half * x))
        .sum();
    half * sum
}

impl Scheduler for LMSDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        self.sigmas.timesteps()
    }

    fn sigma_schedule(&self) -> Option<&SigmaSchedule> {
        Some(&self.sigmas)
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        self.derivatives.begin_step(step_index, self.sigmas.timesteps().len())?;
        let (sigma, _) = self.sigmas.sigma_pair(step_index)?;
        let x = sample.to_dtype(DType::F32)?;
        let mo = model_output.to_dtype(DType::F32)?;
        let x0 = euler_pred_original_sample(self.schedule.prediction_type(), &mo, &x, sigma)?;
        self.derivatives.push(div_f32(&(&x - x0)?, sigma)?);
        let order = (step_index + 1).min(ORDER);
        let mut update: Option<Tensor> = None;
        for k in 0..order {
            let c = self.lms_coefficient(order, step_index, k) as f32;
            let term = mul_f32(self.derivatives.back(k), c)?;
            update = Some(match update {
                None => term,
                Some(u) => (u + term)?,
            });
        }
        let update = update.expect("order >= 1 gives at least one term");
        Ok((x + update)?.to_dtype(sample.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::gauss_legendre_4;

    #[test]
    fn gauss_legendre_4_is_exact_for_cubics_and_degree_7() {
        // ∫_a^b (t³ − 2t + 0.5) dt and ∫_a^b t⁷ dt in closed form, over a sigma-like interval
        // that runs backwards as LMS steps do.
        let (a, b) = (14.6f64, 9.7f64);
        let cubic = |t: f64| t.powi(3) - 2.0 * t + 0.5;
        let want = (b.powi(4) - a.powi(4)) / 4.0 - (b * b - a * a) + 0.5 * (b - a);
        assert!((gauss_legendre_4(cubic, a, b) - want).abs() <= 1e-12 * want.abs());
        let want7 = (b.powi(8) - a.powi(8)) / 8.0;
        assert!((gauss_legendre_4(|t| t.powi(7), a, b) - want7).abs() <= 1e-12 * want7.abs());
    }
}

//! Sigma layouts shared by the sigma-space samplers (Euler, LMS, DPM-Solver): Karras and
//! exponential sigmas (k-diffusion's `get_sigmas_karras` / `get_sigmas_exponential`, as
//! diffusers' `_convert_to_karras` / `_convert_to_exponential`) and the sigma → timestep map
//! (`_sigma_to_t`), all in float64 like diffusers' NumPy code.

use super::config::SchedulerConfig;
use crate::Result;

/// How a sampler lays out its inference sigmas (`use_karras_sigmas`, `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSpacing {
    /// The training sigmas at the inference timesteps (the default).
    Interpolated,
    /// `(σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ`, ρ = 7 (Karras et al., 2022).
    Karras,
    /// `exp(linspace(ln σ_max, ln σ_min, N))`.
    Exponential,
}

impl SigmaSpacing {
    /// The spacing `cfg` asks for. Beta sigmas, flow sigmas and more than one choice are errors
    /// naming the key, as in diffusers' constructors.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        reject_true(
            cfg,
            &[
                ("use_beta_sigmas", cfg.use_beta_sigmas),
                ("use_flow_sigmas", cfg.use_flow_sigmas),
            ],
        )?;
        match (
            cfg.use_karras_sigmas == Some(true),
            cfg.use_exponential_sigmas == Some(true),
        ) {
            (true, true) => Err(cfg.err(
                "use_exponential_sigmas",
                "only one of use_karras_sigmas and use_exponential_sigmas can be true, got both",
            )),
            (true, false) => Ok(SigmaSpacing::Karras),
            (false, true) => Ok(SigmaSpacing::Exponential),
            (false, false) => Ok(SigmaSpacing::Interpolated),
        }
    }

    /// The N sigmas from `sigma_max` down to `sigma_min` (f64); `None` for
    /// [`SigmaSpacing::Interpolated`], whose sigmas come from the timesteps instead.
    pub fn sigmas(self, sigma_min: f64, sigma_max: f64, n: usize) -> Option<Vec<f64>> {
        match self {
            SigmaSpacing::Interpolated => None,
            SigmaSpacing::Karras => {
                let rho = 7.0;
                let (min_inv_rho, max_inv_rho) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
                let ramp = np_linspace(0.0, 1.0, n);
                Some(
                    ramp.into_iter()
                        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
                        .collect(),
                )
            }
            SigmaSpacing::Exponential => Some(
                np_linspace(sigma_max.ln(), sigma_min.ln(), n)
                    .into_iter()
                    .map(f64::exp)
                    .collect(),
            ),
        }
    }
}

/// An error naming the first key of `flags` that is set to true (an unsupported option).
pub(crate) fn reject_true(cfg: &SchedulerConfig, flags: &[(&str, Option<bool>)]) -> Result<()> {
    match flags.iter().find(|(_, on)| *on == Some(true)) {
        Some((key, _)) => Err(cfg.err(key, "not supported by diffalign, got true")),
        None => Ok(()),
    }
}

/// `ln σ` of the training sigmas in float32 (NumPy's `np.log` of the float32 sigma array).
pub fn log_sigmas(train_sigmas: &[f64]) -> Vec<f32> {
    train_sigmas.iter().map(|&s| (s as f32).ln()).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`, by
/// linear interpolation of `ln σ` between the two training timesteps around it (clamped to the
/// training range). `log_sigmas` ascend with the timestep.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index with ln σ_i <= ln σ (0 if none), at most T − 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    // NumPy: (f32 − f64) is f64, (f32 − f32) stays f32.
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// numpy's `linspace(start, stop, n)` in f64: `i·step + start`, the last value exactly `stop`;
/// `[start]` for n = 1.
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut ys: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    ys[n - 1] = stop;
    ys
}

/// numpy's `arange(start, 0, -step)` for a float step: `start + i·δ` with `δ = (start − step)
/// − start` (numpy's rounding of the step), for i in 0..n.
pub(crate) fn np_arange_down(start: f64, step: f64, n: usize) -> Vec<f64> {
    let second = start - step;
    let delta = second - start;
    (0..n)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

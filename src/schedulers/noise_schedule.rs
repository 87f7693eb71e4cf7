//! `NoiseSchedule`: the DDPM forward process of a scheduler config (betas, ᾱ, prediction type),
//! computed once, with the per-sample training helpers (`add_noise`, `velocity`,
//! `training_target`) and the inference timestep and sigma layouts every step rule shares.
//!
//! diffusers counterparts: the constructors and `set_timesteps` of
//! `src/diffusers/schedulers/scheduling_ddim.py` and `scheduling_euler_discrete.py`, and
//! `add_noise`/`get_velocity` of `scheduling_ddpm.py`. diffusers computes betas and ᾱ as float32
//! torch tensors (with a float64 accumulator in `cumprod` on CPU); the values here are those
//! float32 values held in f64, and step coefficients are computed with f32 arithmetic in the same
//! order as diffusers, so results agree to a few float32 ulps.

use candle_core::{DType, Tensor};

use super::config::{
    BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing, TimestepType,
};
use super::sigmas::{log_sigmas, np_arange_down, np_linspace, sigma_to_t, SigmaSpacing};
use crate::{Error, Result};

/// Whether inference timesteps are integers (DDIM: `linspace` values are rounded) or float32
/// (Euler: `linspace` values keep their fraction). Leading and trailing values agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepValues {
    /// Rounded to integers (half to even, as numpy), as `DDIMScheduler` does.
    Integer,
    /// Float32 values, as `EulerDiscreteScheduler` does.
    Float32,
}

/// Betas and cumulative alphas over the `num_train_timesteps` training timesteps.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    prediction_type: PredictionType,
    rescale_betas_zero_snr: bool,
}

impl NoiseSchedule {
    /// Computes betas (from `trained_betas`, or `beta_schedule` with `beta_start`/`beta_end`),
    /// optionally rescaled to zero terminal SNR, and ᾱ_t = Π_{s<=t} (1 − β_s).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        let t = cfg.num_train_timesteps;
        let betas: Vec<f32> = match &cfg.trained_betas {
            Some(b) => {
                for (i, &v) in b.iter().enumerate() {
                    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                        return Err(cfg.err("trained_betas", format!("entry {i} must be in [0, 1), got {v}")));
                    }
                }
                b.iter().map(|&v| v as f32).collect()
            }
            None => {
                for (key, v) in [("beta_start", cfg.beta_start), ("beta_end", cfg.beta_end)] {
                    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                        return Err(cfg.err(key, format!("must be in [0, 1), got {v}")));
                    }
                }
                match cfg.beta_schedule {
                    BetaSchedule::Linear => linspace_f32(cfg.beta_start, cfg.beta_end, t),
                    BetaSchedule::ScaledLinear => linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), t)
                        .into_iter()
                        .map(|b| b * b)
                        .collect(),
                    BetaSchedule::SquaredcosCapV2 => cosine_betas(t),
                }
            }
        };
        let betas = if cfg.rescale_betas_zero_snr {
            if t < 2 {
                return Err(cfg.err(
                    "rescale_betas_zero_snr",
                    format!("needs num_train_timesteps >= 2, got {t}"),
                ));
            }
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas_cumprod = cumprod_f32(betas.iter().map(|&b| 1.0 - b));
        Ok(NoiseSchedule {
            betas: betas.into_iter().map(f64::from).collect(),
            alphas_cumprod: alphas_cumprod.into_iter().map(f64::from).collect(),
            prediction_type: cfg.prediction_type,
            rescale_betas_zero_snr: cfg.rescale_betas_zero_snr,
        })
    }

    /// The number of training timesteps T.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// β_t for t in 0..T (float32 values).
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// ᾱ_t for t in 0..T (float32 values), diffusers' `scheduler.alphas_cumprod`.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// What the model predicts.
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// Whether the betas were rescaled to zero terminal SNR.
    pub fn rescale_betas_zero_snr(&self) -> bool {
        self.rescale_betas_zero_snr
    }

    /// The forward process per sample: `sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·noise`.
    /// `x0`, `noise`: `[B, ...]`; `timesteps`: `[B]` (or a scalar for all), integer values in
    /// 0..T of any dtype. Returns [B, ...] in `x0`'s dtype.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (a, s) = self.per_sample_coefficients(x0, noise, timesteps)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// The forward process in the sigma space of Euler-type schedulers, per sample:
    /// `x0 + σ_t·noise` with `σ_t = sqrt((1−ᾱ_t)/ᾱ_t)` (diffusers' `EulerDiscreteScheduler.add_noise`
    /// at training timestep t; equals `add_noise(x0, noise, t) / sqrt(ᾱ_t)`). Shapes as for
    /// [`NoiseSchedule::add_noise`].
    pub fn add_noise_sigma(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        check_same_shape(x0, noise)?;
        let ts = self.timestep_indices(timesteps, x0.dims().first().copied().unwrap_or(1))?;
        let train = self.train_sigmas();
        let sigma = ts.iter().map(|&t| train[t] as f32).collect();
        let sigma = per_sample_tensor(sigma, x0)?;
        Ok((x0 + noise.broadcast_mul(&sigma)?)?)
    }

    /// The velocity target per sample: `sqrt(ᾱ_t)·noise − sqrt(1−ᾱ_t)·x0` (diffusers'
    /// `get_velocity`). Shapes as for [`NoiseSchedule::add_noise`].
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (a, s) = self.per_sample_coefficients(x0, noise, timesteps)?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// What the model is trained to output for `x_t = add_noise(x0, noise, t)`: the noise for
    /// epsilon prediction, the velocity for v-prediction, x0 for sample prediction.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => {
                self.per_sample_coefficients(x0, noise, timesteps)?;
                Ok(noise.clone())
            }
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => {
                self.per_sample_coefficients(x0, noise, timesteps)?;
                Ok(x0.clone())
            }
        }
    }

    /// `sqrt(ᾱ_t)` and `sqrt(1−ᾱ_t)` per sample as [B, 1, ..., 1] tensors in `x0`'s dtype,
    /// computed in float32 as diffusers does; checks shapes and timestep values.
    fn per_sample_coefficients(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<(Tensor, Tensor)> {
        if x0.dims() != noise.dims() {
            return Err(Error::input(
                "noise",
                format!("expected the shape of x0 {:?}, got {:?}", x0.dims(), noise.dims()),
            ));
        }
        let batch = x0.dims().first().copied().unwrap_or(1);
        let ts = self.timestep_indices(timesteps, batch)?;
        let mut sqrt_a = Vec::with_capacity(ts.len());
        let mut sqrt_1ma = Vec::with_capacity(ts.len());
        for &t in &ts {
            let a = self.alphas_cumprod[t] as f32;
            sqrt_a.push(a.sqrt());
            sqrt_1ma.push((1.0 - a).sqrt());
        }
        Ok((per_sample_tensor(sqrt_a, x0)?, per_sample_tensor(sqrt_1ma, x0)?))
    }

    /// Integer training timesteps from a `[B]` (or scalar) tensor of any dtype.
    fn timestep_indices(&self, timesteps: &Tensor, batch: usize) -> Result<Vec<usize>> {
        let values: Vec<f64> = match timesteps.rank() {
            0 => vec![timesteps.to_dtype(DType::F64)?.to_scalar::<f64>()?],
            1 if timesteps.dim(0)? == batch => timesteps.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            _ => {
                return Err(Error::input(
                    "timesteps",
                    format!("expected shape [{batch}] (one per sample), got {:?}", timesteps.dims()),
                ))
            }
        };
        let t_max = self.num_train_timesteps();
        values
            .into_iter()
            .map(|t| {
                if t.fract() == 0.0 && t >= 0.0 && t < t_max as f64 {
                    Ok(t as usize)
                } else {
                    Err(Error::input(
                        "timesteps",
                        format!("expected integers in 0..{t_max}, got {t}"),
                    ))
                }
            })
            .collect()
    }

    /// Inference timesteps in sampling (descending) order, as diffusers' `set_timesteps`:
    /// - leading: `i·(T div N) + steps_offset` for i in 0..N;
    /// - trailing: `round(T − i·T/N) − 1` (numpy `arange` with a float step, ties to even);
    /// - linspace: `linspace(0, T−1, N)`, rounded for [`TimestepValues::Integer`], float32 otherwise.
    ///
    /// `steps_offset` applies to leading only. Integer timesteps must lie in 0..T. Errors when N
    /// is 0 or above T. Where numpy's float `arange` would yield N+1 trailing values (N = 61,
    /// 103, ... for T = 1000, a diffusers bug that ends on timestep −1), the first N are kept.
    pub fn inference_timesteps(
        &self,
        spacing: TimestepSpacing,
        steps_offset: usize,
        num_inference_steps: usize,
        values: TimestepValues,
    ) -> Result<Vec<f64>> {
        let t_train = self.num_train_timesteps();
        let n = num_inference_steps;
        if n == 0 || n > t_train {
            return Err(Error::input(
                "num_inference_steps",
                format!("must be in 1..={t_train} (num_train_timesteps), got {n}"),
            ));
        }
        let ts: Vec<f64> = match spacing {
            TimestepSpacing::Leading => {
                let ratio = t_train / n;
                (0..n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
            }
            TimestepSpacing::Trailing => np_arange_down(t_train as f64, t_train as f64 / n as f64, n)
                .into_iter()
                .map(|v| v.round_ties_even() - 1.0)
                .collect(),
            TimestepSpacing::Linspace => {
                let ys = np_linspace(0.0, (t_train - 1) as f64, n);
                ys.into_iter()
                    .rev()
                    .map(|v| match values {
                        TimestepValues::Integer => v.round_ties_even(),
                        TimestepValues::Float32 => v as f32 as f64,
                    })
                    .collect()
            }
        };
        if values == TimestepValues::Integer {
            if let Some(&bad) = ts.iter().find(|&&t| t < 0.0 || t >= t_train as f64) {
                return Err(Error::input(
                    "steps_offset",
                    format!("timestep {bad} for {n} steps is outside the {t_train} training timesteps"),
                ));
            }
        }
        Ok(ts)
    }

    /// Training sigmas `sqrt((1−ᾱ_t)/ᾱ_t)` for t in 0..T, in float32 as diffusers' Euler
    /// schedulers compute them (with zero terminal SNR, ᾱ_{T−1} is replaced by 2^-24 first).
    pub fn train_sigmas(&self) -> Vec<f64> {
        let last = self.alphas_cumprod.len() - 1;
        self.alphas_cumprod
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let a = if self.rescale_betas_zero_snr && i == last {
                    2f32.powi(-24)
                } else {
                    a as f32
                };
                f64::from(((1.0 - a) / a).sqrt())
            })
            .collect()
    }

    /// The sigma layout of diffusers' Euler and LMS schedulers for N steps: training sigmas
    /// interpolated linearly at the (float) timesteps, or Karras / exponential sigmas between the
    /// ends of those (timesteps then follow the sigmas through [`sigma_to_t`]), then the final
    /// sigma.
    pub fn sigma_schedule(&self, layout: &SigmaLayout, num_inference_steps: usize) -> Result<SigmaSchedule> {
        let n = num_inference_steps;
        let timesteps =
            self.inference_timesteps(layout.timestep_spacing, layout.steps_offset, n, TimestepValues::Float32)?;
        let train = self.train_sigmas();
        let interpolated: Vec<f64> = timesteps.iter().map(|&t| np_interp_unit(t, &train)).collect();
        let sigma_min = layout.sigma_min.unwrap_or(interpolated[n - 1]);
        let sigma_max = layout.sigma_max.unwrap_or(interpolated[0]);
        let (mut sigmas, timesteps) = match layout.sigma_spacing.sigmas(sigma_min, sigma_max, n) {
            None => (interpolated, timesteps),
            Some(sigmas) => {
                let logs = log_sigmas(&train);
                let ts = sigmas.iter().map(|&s| sigma_to_t(s, &logs) as f32 as f64).collect();
                (sigmas, ts)
            }
        };
        sigmas.push(self.final_sigma(layout.final_sigmas_type));
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        let timesteps = if layout.timestep_type == TimestepType::Continuous
            && self.prediction_type == PredictionType::VPrediction
        {
            sigmas[..n].iter().map(|&s| f64::from((s as f32).ln() * 0.25)).collect()
        } else {
            timesteps
        };
        let max = sigmas.iter().copied().fold(0.0f64, f64::max) as f32;
        let init_noise_sigma = match layout.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma: f64::from(init_noise_sigma),
        })
    }

    /// The sigma after the last step: 0, or the training sigma of timestep 0 (float32).
    pub fn final_sigma(&self, final_sigmas_type: FinalSigmasType) -> f64 {
        match final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => {
                let a = self.alphas_cumprod[0] as f32;
                f64::from(((1.0 - a) / a).sqrt())
            }
        }
    }
}

/// The settings of a sigma layout ([`NoiseSchedule::sigma_schedule`]), diffusers' constructor
/// arguments of the same names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SigmaLayout {
    /// How the inference timesteps are spread.
    pub timestep_spacing: TimestepSpacing,
    /// Added to leading timesteps.
    pub steps_offset: usize,
    /// Interpolated, Karras or exponential sigmas.
    pub sigma_spacing: SigmaSpacing,
    /// The lower end of Karras / exponential sigmas (`None`: the last interpolated sigma).
    pub sigma_min: Option<f64>,
    /// The upper end of Karras / exponential sigmas (`None`: the first interpolated sigma).
    pub sigma_max: Option<f64>,
    /// The sigma after the last step.
    pub final_sigmas_type: FinalSigmasType,
    /// What the model gets as timestep.
    pub timestep_type: TimestepType,
}

impl SigmaLayout {
    /// Interpolated sigmas with a final 0 and discrete timesteps, the other fields from `cfg`
    /// for a class whose default spacing is `kind`'s.
    pub fn plain(cfg: &SchedulerConfig, kind: SchedulerKind) -> Self {
        SigmaLayout {
            timestep_spacing: cfg.timestep_spacing_for(kind),
            steps_offset: cfg.steps_offset,
            sigma_spacing: SigmaSpacing::Interpolated,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: FinalSigmasType::Zero,
            timestep_type: TimestepType::Discrete,
        }
    }
}

impl NoiseSchedule {
    /// One Euler step from timestep `t` (in `[0, T−1]`, fractional allowed) straight to σ = 0,
    /// starting from noise scaled by σ_t: the one-step generation ReNO runs at an explicit
    /// timestep, which for t = T−1 is a one-step trailing Euler schedule (SD-Turbo's).
    pub fn one_step_sigmas(&self, t: f64) -> Result<SigmaSchedule> {
        let last = (self.alphas_cumprod.len() - 1) as f64;
        if !(0.0..=last).contains(&t) {
            return Err(Error::input(
                "timestep",
                format!("expected a value in [0, {last}] (the training timesteps), got {t}"),
            ));
        }
        let sigma = np_interp_unit(t, &self.train_sigmas()) as f32 as f64;
        Ok(SigmaSchedule {
            timesteps: vec![t],
            sigmas: vec![sigma, 0.0],
            init_noise_sigma: sigma,
        })
    }
}

/// Checks that the noise has the shape of x0.
fn check_same_shape(x0: &Tensor, noise: &Tensor) -> Result<()> {
    if x0.dims() != noise.dims() {
        return Err(Error::input(
            "noise",
            format!("expected the shape of x0 {:?}, got {:?}", x0.dims(), noise.dims()),
        ));
    }
    Ok(())
}

/// Per-sample values as a [B, 1, ..., 1] tensor of `like`'s rank, dtype and device.
fn per_sample_tensor(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.resize(like.rank().max(1), 1);
    Ok(Tensor::from_vec(values, shape.as_slice(), like.device())?.to_dtype(like.dtype())?)
}

/// Timesteps and sigmas of an Euler-type sampler.
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaSchedule {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl SigmaSchedule {
    /// What the model gets as timestep at each step (float32 values), in sampling order.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The N + 1 sigmas (float32 values): one per step, then the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The scale of the initial noise: the largest sigma, or `sqrt(σ_max² + 1)` for leading
    /// spacing (diffusers' rule).
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The sigma at `step_index` and the next one, checking the index.
    pub fn sigma_pair(&self, step_index: usize) -> Result<(f32, f32)> {
        let n = self.timesteps.len();
        if step_index >= n {
            return Err(step_index_error(step_index, n));
        }
        Ok((self.sigmas[step_index] as f32, self.sigmas[step_index + 1] as f32))
    }

    /// The model input at `step_index`: `sample / sqrt(σ² + 1)`, computed in float32 and
    /// returned in `sample`'s dtype.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        let denom = (sigma * sigma + 1.0).sqrt();
        div_f32(&sample.to_dtype(DType::F32)?, denom)?
            .to_dtype(sample.dtype())
            .map_err(Into::into)
    }
}

/// The error for a step index past the last step.
pub(crate) fn step_index_error(step_index: usize, n: usize) -> Error {
    Error::input(
        "step_index",
        format!("expected an index in 0..{n} ({n} inference steps), got {step_index}"),
    )
}

/// Checks that the model output has the sample's shape.
pub(crate) fn check_step_shapes(model_output: &Tensor, sample: &Tensor) -> Result<()> {
    crate::error::same_shape("model_output", model_output.dims(), "the sample", sample.dims())
}

/// `x · c` with a float32 scalar: exact float32 multiplication on an f32 tensor.
pub(crate) fn mul_f32(x: &Tensor, c: f32) -> Result<Tensor> {
    Ok(x.affine(f64::from(c), 0.0)?)
}

/// `x / c` with a float32 scalar, as a true division (not a multiplication by 1/c).
pub(crate) fn div_f32(x: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&c)?)
}

/// A float32 `linspace(start, stop, n)` (torch's values up to one float32 ulp).
fn linspace_f32(start: f64, stop: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    (0..n)
        .map(|i| (start + (stop - start) * i as f64 / (n - 1) as f64) as f32)
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform, max beta 0.999.
fn cosine_betas(t: usize) -> Vec<f32> {
    let alpha_bar = |x: f64| ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..t)
        .map(|i| {
            let t1 = i as f64 / t as f64;
            let t2 = (i + 1) as f64 / t as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// torch's CPU `cumprod` of float32 values: a float64 accumulator, each output rounded.
fn cumprod_f32(alphas: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .map(|a| {
            acc *= f64::from(a);
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1) in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let abar = cumprod_f32(betas.iter().map(|&b| 1.0 - b));
    let mut s: Vec<f32> = abar.iter().map(|a| a.sqrt()).collect();
    let s0 = s[0];
    let s_t = s[s.len() - 1];
    let scale = s0 / (s0 - s_t);
    for v in &mut s {
        *v = (*v - s_t) * scale;
    }
    let abar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(abar.len());
    out.push(1.0 - abar[0]);
    for w in abar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// numpy's `interp(x, arange(len(fp)), fp)`: linear interpolation on the unit grid, clamped to
/// the end values.
fn np_interp_unit(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

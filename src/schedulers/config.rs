//! `SchedulerConfig`: a diffusers `scheduler/scheduler_config.json`, read key by key with the
//! constructor defaults of diffusers 0.42 (`src/diffusers/schedulers/scheduling_*.py`), and the
//! factory that turns it into a [`Scheduler`] for a number of inference steps.
//!
//! Any diffusers scheduler class is accepted for its shared fields (beta schedule, prediction
//! type, timestep spacing and offset), like `XScheduler.from_config(pipe.scheduler.config)`; a
//! sampler can be built for the classes of [`SchedulerKind`]. Keys the chosen class reads are
//! validated when it is built: an unsupported non-default value is an error naming the key.
//! Unknown keys are kept in [`SchedulerConfig::other`] and listed by
//! [`SchedulerConfig::unknown_keys`] so that the caller can warn about them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ddim::DDIMScheduler;
use super::ddim_inverse::DDIMInverseScheduler;
use super::ddpm::DDPMScheduler;
use super::dpm_solver_multistep::DPMSolverMultistepScheduler;
use super::euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
use super::euler_discrete::EulerDiscreteScheduler;
pub use super::kind::SchedulerKind;
use super::lms_discrete::LMSDiscreteScheduler;
use super::pndm::PNDMScheduler;
use super::python_json;
use super::unipc_multistep::UniPCMultistepScheduler;
use super::Scheduler;
use crate::{Error, Result};

/// How the betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal (2021), betas capped at 0.999.
    SquaredcosCapV2,
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// The velocity `v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0` (Salimans & Ho, 2022).
    VPrediction,
    /// The clean sample x0.
    Sample,
}

/// How inference timesteps are spread over the training range (`timestep_spacing`), see
/// Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv 2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `i · (T / N) + steps_offset`, integer step ratio, the highest timestep below `T`.
    Leading,
    /// `round(T − i · T / N) − 1`: starts at `T − 1`.
    Trailing,
    /// `linspace(0, T − 1, N)`, reversed (rounded for DDIM, fractional for Euler).
    Linspace,
}

/// How Euler sigmas are interpolated between training timesteps (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// Linear interpolation of the training sigmas at the (fractional) timestep.
    Linear,
    /// Log-linear sigmas (not supported: building a sampler from it is an error).
    LogLinear,
}

/// What the Euler scheduler passes to the model as timestep (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// The (fractional) training timestep.
    Discrete,
    /// `0.25 · ln(sigma)` for v-prediction models; the training timestep otherwise.
    Continuous,
}

/// The last Euler sigma (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// The last step goes to sigma 0 (a clean sample).
    Zero,
    /// The last step goes to the sigma of training timestep 0.
    SigmaMin,
}

/// The DPM-Solver variant (`algorithm_type`, `DPMSolverMultistepScheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AlgorithmType {
    /// DPM-Solver on the noise prediction (deprecated in diffusers; not supported here).
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// DPM-Solver++ on the data prediction (Lu et al., 2022, arXiv 2211.01095).
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// SDE-DPM-Solver (deprecated in diffusers; not supported here).
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    /// SDE-DPM-Solver++: the stochastic DPM-Solver++ that adds fresh noise each step.
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// DEIS, which diffusers' DPM-Solver replaces by DPM-Solver++.
    #[serde(rename = "deis")]
    Deis,
}

/// The second-order rule (`solver_type`): DPM-Solver reads midpoint / heun (and, like diffusers,
/// takes logrho / bh1 / bh2 as midpoint); UniPC reads bh1 / bh2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// DPM-Solver's midpoint rule.
    Midpoint,
    /// DPM-Solver's Heun rule.
    Heun,
    /// DEIS' log-rho rule (a midpoint DPM-Solver here).
    Logrho,
    /// UniPC with B(h) = h.
    Bh1,
    /// UniPC with B(h) = e^h − 1.
    Bh2,
}

/// The DDPM posterior variance (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// β̃_t = (1 − ᾱ_prev)/(1 − ᾱ_t)·β_t (DDPM's default).
    FixedSmall,
    /// `exp(0.5·ln β̃_t)` used directly as the standard deviation.
    FixedSmallLog,
    /// β_t.
    FixedLarge,
    /// `ln β_t` used directly as the standard deviation.
    FixedLargeLog,
    /// A variance the model predicts (not supported for sampling).
    Learned,
    /// An interpolation the model predicts (not supported for sampling).
    LearnedRange,
}

/// A diffusers scheduler configuration (`scheduler_config.json`). Fields are the JSON keys;
/// absent keys take diffusers' constructor defaults, noted per field.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`: the diffusers class that wrote the file (any class is accepted here).
    pub class_name: Option<String>,
    /// Number of training timesteps T (default 1000).
    pub num_train_timesteps: usize,
    /// First beta (default 0.0001).
    pub beta_start: f64,
    /// Last beta (default 0.02).
    pub beta_end: f64,
    /// Beta layout (default linear).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, which replace `beta_start`/`beta_end`/`beta_schedule` (default none).
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts (default epsilon).
    pub prediction_type: PredictionType,
    /// Timestep spacing; absent means the built class's default (leading for DDIM, linspace for
    /// Euler), as diffusers' `from_config` does.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Offset added to leading timesteps (default 0; Stable Diffusion uses 1).
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR, arXiv 2305.08891 (default false).
    pub rescale_betas_zero_snr: bool,
    /// DDIM: clamp the predicted x0 to `±clip_sample_range` (default true).
    pub clip_sample: bool,
    /// DDIM: the clamp range (default 1.0).
    pub clip_sample_range: f64,
    /// DDIM and PNDM: ᾱ before timestep 0 is 1 (true) or ᾱ_0 (false); absent means the built
    /// class's default (DDIM true, PNDM false).
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: dynamic thresholding (default false; true is not supported).
    pub thresholding: bool,
    /// DDIM: percentile of dynamic thresholding (default 0.995; unused without thresholding).
    pub dynamic_thresholding_ratio: f64,
    /// DDIM: upper bound of dynamic thresholding (default 1.0; unused without thresholding).
    pub sample_max_value: f64,
    /// Euler: Karras sigmas (default false; true is not supported).
    pub use_karras_sigmas: Option<bool>,
    /// Euler: exponential sigmas (default false; true is not supported).
    pub use_exponential_sigmas: Option<bool>,
    /// Euler: beta sigmas (default false; true is not supported).
    pub use_beta_sigmas: Option<bool>,
    /// Euler: sigma interpolation (default linear; log_linear is not supported).
    pub interpolation_type: InterpolationType,
    /// Euler: what the model gets as timestep (default discrete).
    pub timestep_type: TimestepType,
    /// Euler: the last sigma (default zero).
    pub final_sigmas_type: FinalSigmasType,
    /// Euler: lower sigma bound of Karras/exponential/beta sigmas (default none; unused here).
    pub sigma_min: Option<f64>,
    /// Euler: upper sigma bound of Karras/exponential/beta sigmas (default none: the largest
    /// training sigma).
    pub sigma_max: Option<f64>,
    /// PNDM: skip the Runge-Kutta warm-up steps (default false; false is not supported).
    pub skip_prk_steps: bool,
    /// DPM-Solver and UniPC: the multistep order, 1 to 3 (default 2).
    pub solver_order: usize,
    /// DPM-Solver: the variant (default dpmsolver++).
    pub algorithm_type: AlgorithmType,
    /// DPM-Solver (default midpoint) and UniPC (default bh2): the second-order rule.
    pub solver_type: Option<SolverType>,
    /// DPM-Solver and UniPC: lower the order on the last steps (default true).
    pub lower_order_final: bool,
    /// DPM-Solver: a first-order last step (default false).
    pub euler_at_final: bool,
    /// DPM-Solver: timesteps whose λ = ln(α/σ) lies below this are dropped (default −∞, written
    /// `-Infinity` by diffusers).
    pub lambda_min_clipped: f64,
    /// DDPM: the posterior variance (default fixed_small); DPM-Solver: learned variance
    /// channels (default none).
    pub variance_type: Option<VarianceType>,
    /// UniPC: solve for the data prediction (default true; false is not supported).
    pub predict_x0: bool,
    /// UniPC: the steps whose corrector is skipped (default none).
    pub disable_corrector: Vec<usize>,
    /// DPM-Solver: Lu's uniform-λ spacing (default false; true is not supported).
    pub use_lu_lambdas: Option<bool>,
    /// Flow-matching sigmas (default false; true is not supported).
    pub use_flow_sigmas: Option<bool>,
    /// Resolution-dependent timestep shifting (default false; true is not supported).
    pub use_dynamic_shifting: Option<bool>,
    /// Keys this crate does not read (other classes' settings, newer keys), verbatim.
    pub other: BTreeMap<String, serde_json::Value>,
    /// Where the config came from, for error messages.
    pub source: PathBuf,
}

impl Default for SchedulerConfig {
    /// diffusers' constructor defaults (DDIMScheduler / EulerDiscreteScheduler), no class name.
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            interpolation_type: InterpolationType::Linear,
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            sigma_min: None,
            sigma_max: None,
            skip_prk_steps: false,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: None,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            predict_x0: true,
            disable_corrector: Vec::new(),
            use_lu_lambdas: None,
            use_flow_sigmas: None,
            use_dynamic_shifting: None,
            other: BTreeMap::new(),
            source: PathBuf::from("scheduler_config.json"),
        }
    }
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&crate::json::read_text(path, "scheduler config")?, path)
    }

    /// Parses the text of a `scheduler_config.json`; `source` names it in errors.
    pub fn from_json(text: &str, source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        let value = python_json::parse(text).map_err(|e| {
            let reason = match e.classify() {
                serde_json::error::Category::Data => format!("not a valid scheduler config: {e}"),
                _ => format!("malformed JSON: {e}"),
            };
            Error::config(&source, "(file)", reason)
        })?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(Error::config(&source, "(file)", "expected a JSON object"));
        };
        let mut cfg = SchedulerConfig {
            source,
            ..SchedulerConfig::default()
        };

        // Each key is read on its own, so that a bad value names its key; float keys also take
        // Python's `-Infinity`, `Infinity` and `NaN`.
        macro_rules! read {
            ($parse:expr; $($field:ident),* $(,)?) => {$(
                if let Some(v) = map.remove(stringify!($field)) {
                    cfg.$field = $parse(v).map_err(|e| Error::config(&cfg.source, stringify!($field), e))?;
                }
            )*};
        }
        read!(python_json::value;
            num_train_timesteps,
            beta_schedule,
            trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset,
            rescale_betas_zero_snr,
            clip_sample,
            set_alpha_to_one,
            thresholding,
            use_karras_sigmas,
            use_exponential_sigmas,
            use_beta_sigmas,
            interpolation_type,
            timestep_type,
            final_sigmas_type,
            skip_prk_steps,
            solver_order,
            algorithm_type,
            solver_type,
            lower_order_final,
            euler_at_final,
            variance_type,
            predict_x0,
            disable_corrector,
            use_lu_lambdas,
            use_flow_sigmas,
            use_dynamic_shifting,
        );
        read!(python_json::float;
            beta_start,
            beta_end,
            clip_sample_range,
            dynamic_thresholding_ratio,
            sample_max_value,
            lambda_min_clipped,
        );
        read!(python_json::optional_float; sigma_min, sigma_max);
        // Settings of flow-matching and dynamic shifting, which are errors when switched on
        // (`use_flow_sigmas`, `use_dynamic_shifting`): without them these keys do nothing.
        for key in ["flow_shift", "time_shift_type"] {
            map.remove(key);
        }
        // UniPC's external predictor and flow-sigma stretch: supported only as null.
        for key in ["solver_p", "shift_terminal"] {
            if let Some(v) = map.remove(key).filter(|v| !v.is_null()) {
                return Err(Error::config(
                    &cfg.source,
                    key,
                    format!("only null is supported, got {v}"),
                ));
            }
        }
        if let Some(v) = map.remove("_class_name") {
            cfg.class_name =
                Some(serde_json::from_value(v).map_err(|e| Error::config(&cfg.source, "_class_name", e.to_string()))?);
        }
        cfg.other = map.into_iter().collect();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the fields every class reads (what diffusers' constructors would fail on).
    pub fn validate(&self) -> Result<()> {
        let t = self.num_train_timesteps;
        if t == 0 {
            return Err(self.err("num_train_timesteps", "must be > 0, got 0"));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != t {
                return Err(self.err(
                    "trained_betas",
                    format!("expected num_train_timesteps = {t} values, got {}", betas.len()),
                ));
            }
        }
        let range = self.clip_sample_range;
        if self.clip_sample && !(range.is_finite() && range >= 0.0) {
            return Err(self.err("clip_sample_range", format!("must be a finite value >= 0, got {range}")));
        }
        Ok(())
    }

    /// Keys of the file that diffalign does not read (other classes' settings, `_`-prefixed
    /// metadata excluded), for a warning at load time.
    pub fn unknown_keys(&self) -> Vec<String> {
        self.other.keys().filter(|k| !k.starts_with('_')).cloned().collect()
    }

    /// The class a sampler is built as: `kind` if given, else the file's `_class_name`.
    pub fn kind(&self, kind: Option<SchedulerKind>) -> Result<SchedulerKind> {
        if let Some(kind) = kind {
            return Ok(kind);
        }
        let supported = SchedulerKind::supported_classes();
        match &self.class_name {
            None => Err(self.err(
                "_class_name",
                format!(
                    "missing, so the scheduler class is unknown; choose one with --scheduler (supported: {supported})"
                ),
            )),
            Some(name) => SchedulerKind::from_class_name(name).ok_or_else(|| {
                self.err(
                    "_class_name",
                    format!(
                        "scheduler class {name:?} is not supported for sampling; supported: {supported} \
                         (choose one with --scheduler to keep this file's beta schedule)"
                    ),
                )
            }),
        }
    }

    /// The timestep spacing for `kind`: the file's, else that class's diffusers default.
    pub fn timestep_spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or_else(|| kind.default_timestep_spacing())
    }

    /// `set_alpha_to_one` for `kind`: the file's, else that class's diffusers default.
    pub fn set_alpha_to_one_for(&self, kind: SchedulerKind) -> bool {
        self.set_alpha_to_one.unwrap_or_else(|| kind.default_set_alpha_to_one())
    }

    /// Builds the sampler for `num_inference_steps` (1 ..= `num_train_timesteps`) as `kind`, or as
    /// the file's `_class_name` when `kind` is `None`, keeping this file's beta schedule,
    /// prediction type, spacing and offset (diffusers' `XScheduler.from_config(config)`).
    pub fn build(&self, kind: Option<SchedulerKind>, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(match self.kind(kind)? {
            SchedulerKind::Ddim => Box::new(DDIMScheduler::from_config(self, num_inference_steps)?),
            SchedulerKind::DdimInverse => Box::new(DDIMInverseScheduler::from_config(self, num_inference_steps)?),
            SchedulerKind::EulerDiscrete => Box::new(EulerDiscreteScheduler::from_config(self, num_inference_steps)?),
            SchedulerKind::EulerAncestralDiscrete => {
                Box::new(EulerAncestralDiscreteScheduler::from_config(self, num_inference_steps)?)
            }
            SchedulerKind::Pndm => Box::new(PNDMScheduler::from_config(self, num_inference_steps)?),
            SchedulerKind::DpmSolverMultistep => {
                Box::new(DPMSolverMultistepScheduler::from_config(self, num_inference_steps)?)
            }
            SchedulerKind::LmsDiscrete => Box::new(LMSDiscreteScheduler::from_config(self, num_inference_steps)?),
            SchedulerKind::UniPcMultistep => Box::new(UniPCMultistepScheduler::from_config(self, num_inference_steps)?),
            SchedulerKind::Ddpm => Box::new(DDPMScheduler::from_config(self, num_inference_steps)?),
        })
    }

    /// A config error on this file's `key`.
    pub(crate) fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::config(&self.source, key, reason)
    }
}

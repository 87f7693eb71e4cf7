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
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use super::ddim::DDIMScheduler;
use super::ddim_inverse::DDIMInverseScheduler;
use super::euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
use super::euler_discrete::EulerDiscreteScheduler;
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

/// The scheduler classes diffalign can sample with (`--scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `DDIMScheduler` (`ddim`).
    Ddim,
    /// `DDIMInverseScheduler` (`ddim-inverse`): runs from a clean sample towards noise.
    DdimInverse,
    /// `EulerDiscreteScheduler` (`euler`).
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`, `euler_ancestral`).
    EulerAncestralDiscrete,
}

impl SchedulerKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Ddim,
        SchedulerKind::DdimInverse,
        SchedulerKind::EulerDiscrete,
        SchedulerKind::EulerAncestralDiscrete,
    ];

    /// The diffusers class name (`"DDIMScheduler"`, ...).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DdimInverse => "DDIMInverseScheduler",
            SchedulerKind::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
        }
    }

    /// The command-line name (`"ddim"`, `"ddim-inverse"`, `"euler"`, `"euler-a"`).
    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DdimInverse => "ddim-inverse",
            SchedulerKind::EulerDiscrete => "euler",
            SchedulerKind::EulerAncestralDiscrete => "euler-a",
        }
    }

    /// The kind of a diffusers `_class_name`, if it is one diffalign can sample with.
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }

    /// The timestep spacing diffusers' constructor of this class defaults to.
    pub fn default_timestep_spacing(self) -> TimestepSpacing {
        match self {
            SchedulerKind::Ddim | SchedulerKind::DdimInverse => TimestepSpacing::Leading,
            SchedulerKind::EulerDiscrete | SchedulerKind::EulerAncestralDiscrete => TimestepSpacing::Linspace,
        }
    }

    fn supported_classes() -> String {
        Self::ALL.map(|k| k.class_name()).join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Parses a command-line name (`ddim`, `ddim-inverse`, `euler`, `euler-a`, with `_` or `-`,
    /// and `euler-ancestral`) or a diffusers class name.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase().replace('_', "-");
        let kind = match lower.as_str() {
            "ddim" => Some(SchedulerKind::Ddim),
            "ddim-inverse" => Some(SchedulerKind::DdimInverse),
            "euler" => Some(SchedulerKind::EulerDiscrete),
            "euler-a" | "euler-ancestral" => Some(SchedulerKind::EulerAncestralDiscrete),
            _ => SchedulerKind::from_class_name(s.trim()),
        };
        kind.ok_or_else(|| {
            let valid = Self::ALL.map(|k| k.cli_name()).join(", ");
            Error::input(
                "--scheduler",
                format!("unknown scheduler {s:?}, expected one of {valid}"),
            )
        })
    }
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
    /// DDIM: ᾱ before timestep 0 is 1 (true) or ᾱ_0 (false) (default true).
    pub set_alpha_to_one: bool,
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
    /// Euler: upper sigma bound of Karras/exponential/beta sigmas (default none; unused here).
    pub sigma_max: Option<f64>,
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
            set_alpha_to_one: true,
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
        let value: serde_json::Value = crate::json::parse_json(text, &source, "scheduler config")?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(Error::config(&source, "(file)", "expected a JSON object"));
        };
        let mut cfg = SchedulerConfig {
            source,
            ..SchedulerConfig::default()
        };

        // Each key is read on its own, so that a bad value names its key.
        macro_rules! read {
            ($($field:ident),* $(,)?) => {$(
                if let Some(v) = map.remove(stringify!($field)) {
                    cfg.$field = serde_json::from_value(v)
                        .map_err(|e| Error::config(&cfg.source, stringify!($field), e.to_string()))?;
                }
            )*};
        }
        read!(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset,
            rescale_betas_zero_snr,
            clip_sample,
            clip_sample_range,
            set_alpha_to_one,
            thresholding,
            dynamic_thresholding_ratio,
            sample_max_value,
            use_karras_sigmas,
            use_exponential_sigmas,
            use_beta_sigmas,
            interpolation_type,
            timestep_type,
            final_sigmas_type,
            sigma_min,
            sigma_max,
        );
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
        })
    }

    /// A config error on this file's `key`.
    pub(crate) fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::config(&self.source, key, reason)
    }
}

//! Training recipes: `pipelines/*.toml` read into a validated [`Plan`].
//!
//! A recipe has the tables `[model]`, `[data]`, `[train]`, optionally `[lora]` (LoRA training;
//! without it the whole UNet is trained) and `[output]`. Unknown keys are errors. `--set
//! key=value` overrides any key by its dotted path (`train.steps=10`); the value is read as a TOML
//! value, or as a string when it is not one. Relative paths are taken from the current folder.

pub mod reward_ft;

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Deserialize;

use crate::data::DataSpec;
use crate::optim::{AdamWConfig, LrSchedule, OptimizerConfig};
use crate::preference::diffusion::Method;
use crate::preference::kto::KtoSettings;
use crate::preference::{LossType, Objective};
use crate::{Error, Result};

/// `[model]`: what to fine-tune.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A diffusers pipeline folder or a cached Hub repo id.
    pub path: String,
    /// Cache revision of a repo id.
    #[serde(default)]
    pub revision: Option<String>,
    /// A replacement VAE: a `vae/` folder or a cached VAE repo id (e.g. the fp16-fixed SDXL VAE).
    #[serde(default)]
    pub vae: Option<String>,
    /// Weight-file variant (`fp16`).
    #[serde(default)]
    pub variant: Option<String>,
    /// Compute dtype: f32, f16, bf16 (master weights and optimizer state stay f32).
    #[serde(default = "crate::device::default_dtype_name")]
    pub dtype: String,
}

/// `[train]`: the method and the optimisation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// dpo, dcpo, mapo, smpo, kto or npo; or a reward method: draft, alignprop or refl
    /// ([`reward_ft`]).
    pub method: String,
    /// Beta (default: the method's paper value).
    #[serde(default)]
    pub beta: Option<f64>,
    /// Loss form of the DPO family, TRL's `loss_type` names (see `preference::LOSS_TYPES`).
    #[serde(default = "default_loss_type")]
    pub loss_type: String,
    /// Label smoothing of the sigmoid, robust, exo_pair, aot and simpo losses.
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's gamma (default 0.5).
    #[serde(default)]
    pub simpo_gamma: Option<f64>,
    /// DiscoPOP's tau (default 0.05).
    #[serde(default)]
    pub discopop_tau: Option<f64>,
    /// KTO: weight of desirable images, lambda_D.
    #[serde(default = "one_f64")]
    pub kto_lambda_d: f64,
    /// KTO: weight of undesirable images, lambda_U.
    #[serde(default = "one_f64")]
    pub kto_lambda_u: f64,
    /// KTO's value function: sigmoid (Kahneman-Tversky), linear or log_sigmoid.
    #[serde(default = "default_loss_type")]
    pub halo: String,
    /// SmPO's inversion steps (5 for SD 1.5, 10 for SDXL; 0: forward noising as Diffusion-DPO).
    #[serde(default = "default_inversion_steps")]
    pub inversion_steps: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Pairs per forward pass.
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Forward passes per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    #[serde(default = "default_schedule")]
    pub lr_schedule: LrSchedule,
    /// Warm-up steps of the schedule.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (none when absent or 0).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// AdamW settings, the older spelling of `[train.optimizer] kind = "adamw"`.
    #[serde(default)]
    pub adam: Option<AdamWConfig>,
    /// The optimizer (`kind` = adamw, adamw8bit or adafactor) and its settings; AdamW when absent.
    #[serde(default)]
    pub optimizer: Option<OptimizerConfig>,
    /// Seed of every random choice (data order, crops, flips, noise, timesteps).
    #[serde(default)]
    pub seed: u64,
    /// Training resolution in pixels (square).
    pub resolution: usize,
    /// Centre crop (true) or random crop.
    #[serde(default = "yes")]
    pub center_crop: bool,
    /// Random horizontal flips.
    #[serde(default = "yes")]
    pub random_flip: bool,
    /// One flip decision for both images of a pair (MaPO) instead of one each (Diffusion-DPO).
    #[serde(default)]
    pub flip_pair_together: Option<bool>,
    /// Probability of training on an empty caption.
    #[serde(default)]
    pub empty_caption_prob: f64,
    /// Encode each image once and keep its latent distribution under `output.dir/latents`.
    #[serde(default = "yes")]
    pub cache_latents: bool,
    /// Stop after this many non-finite steps in a row (each is skipped and logged).
    #[serde(default = "default_max_nonfinite")]
    pub max_nonfinite_steps: usize,
    /// Recompute the policy's activations block by block in the backward pass (diffusers'
    /// gradient checkpointing): less memory for one extra forward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl TrainSection {
    /// The optimizer: `[train.optimizer]`, else AdamW with `[train.adam]`'s (or default) settings.
    pub fn optimizer_config(&self) -> OptimizerConfig {
        self.optimizer
            .unwrap_or_else(|| OptimizerConfig::AdamW(self.adam.unwrap_or_default()))
    }
}

fn default_loss_type() -> String {
    "sigmoid".into()
}
fn one_f64() -> f64 {
    1.0
}
fn default_inversion_steps() -> usize {
    5
}
fn one() -> usize {
    1
}
fn default_schedule() -> LrSchedule {
    LrSchedule::Constant
}
fn default_clip() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_max_nonfinite() -> usize {
    5
}

/// `[lora]`: train a LoRA adapter instead of the whole UNet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Alpha (default: the rank, so scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Target modules, by name suffix (`to_q`) or full diffusers path.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Also train adapters on the text encoder (both encoders for SDXL), with the same rank
    /// and alpha.
    #[serde(default)]
    pub text_encoder: bool,
    /// The text encoders' target modules, by name suffix or full path.
    #[serde(default = "default_text_encoder_targets")]
    pub text_encoder_targets: Vec<String>,
    /// The text-encoder adapters' base learning rate (default `train.lr`), on the same schedule.
    #[serde(default)]
    pub text_encoder_lr: Option<f64>,
}

impl LoraSection {
    /// The fresh text-encoder adapters' configuration: this rank and alpha, the text-encoder
    /// targets, `seed` for their initialisation.
    pub fn text_encoder_config(&self, seed: u64) -> crate::weights::lora::LoraConfig {
        crate::weights::lora::LoraConfig {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(self.rank as f64),
            target_modules: self.text_encoder_targets.clone(),
            init_seed: seed,
        }
    }
}

fn default_rank() -> usize {
    8
}
fn default_targets() -> Vec<String> {
    crate::weights::lora::DEFAULT_TARGETS.map(String::from).to_vec()
}
fn default_text_encoder_targets() -> Vec<String> {
    crate::weights::lora::DEFAULT_TEXT_ENCODER_TARGETS
        .map(String::from)
        .to_vec()
}

/// `[output]`: where results go and what is written along the way.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Output folder (created if needed).
    pub dir: PathBuf,
    /// Write a resumable checkpoint every N optimizer steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Generate validation images every N steps (0: only before and after).
    #[serde(default)]
    pub validation_every: usize,
    /// Validation prompts (none: no validation images).
    #[serde(default)]
    pub validation_prompts: Vec<String>,
    /// Seeds of the validation images.
    #[serde(default = "default_seeds")]
    pub validation_seeds: Vec<u64>,
    /// Denoising steps of the validation images.
    #[serde(default = "default_validation_steps")]
    pub validation_steps: usize,
    /// Guidance of the validation images.
    #[serde(default = "default_validation_guidance")]
    pub validation_guidance: f64,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_validation_steps() -> usize {
    25
}
fn default_validation_guidance() -> f64 {
    7.5
}

/// A recipe as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]`.
    pub data: DataSpec,
    /// `[train]`.
    pub train: TrainSection,
    /// `[lora]`, when training a LoRA.
    #[serde(default)]
    pub lora: Option<LoraSection>,
    /// `[output]`.
    pub output: OutputSection,
    /// `[reward_ft]`: the reward methods' sampling and truncation.
    #[serde(default)]
    pub reward_ft: Option<reward_ft::RewardFtSection>,
    /// `[[reward]]`: the reward methods' rewards.
    #[serde(default)]
    pub reward: Vec<reward_ft::RewardSection>,
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The recipe file.
    pub source: PathBuf,
    /// The recipe as written (after `--set`).
    pub raw: RawRecipe,
    /// The preference method (Diffusion-DPO's for a reward method, whose loss it does not use).
    pub method: Method,
    /// The objective, validated.
    pub objective: Objective,
    /// The compute dtype (`model.dtype`).
    pub dtype: DType,
    /// The TOML text after overrides (saved beside the results).
    pub resolved_toml: String,
    /// A reward method's settings (`None` for a preference method).
    pub reward_ft: Option<reward_ft::RewardFtPlan>,
}

/// Applies `key=value` to `table` at the dotted `key`.
fn apply_set(table: &mut toml::Table, set: &str, source: &Path) -> Result<()> {
    let (key, value) = set
        .split_once('=')
        .ok_or_else(|| Error::input("--set", format!("expected key=value, got {set:?}")))?;
    let parsed: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("the key was just written"),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = table;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(part.to_string(), parsed);
            return Ok(());
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| Error::config(source, key, format!("--set: {part} is not a table")))?;
    }
    Err(Error::input("--set", format!("empty key in {set:?}")))
}

impl Plan {
    /// Reads `path`, applies `sets` (`key=value`), and validates.
    pub fn load(path: &Path, sets: &[String]) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::config(path, "(toml)", e.to_string()))?;
        for s in sets {
            apply_set(&mut table, s, path)?;
        }
        Self::from_table(path, table)
    }

    /// Validates a recipe given as a TOML table (one a program built rather than read); `path`
    /// is where it is said to come from, in errors and in [`Plan::source`].
    pub fn from_table(path: &Path, table: toml::Table) -> Result<Plan> {
        let resolved_toml = toml::to_string(&table).map_err(|e| Error::config(path, "(toml)", e.to_string()))?;
        let raw: RawRecipe = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config(path, "(recipe)", e.message().to_string()))?;
        Self::validate(path, raw, resolved_toml)
    }

    fn validate(path: &Path, raw: RawRecipe, resolved_toml: String) -> Result<Plan> {
        let err = |key: &str, reason: String| Error::config(path, key, reason);
        let t = &raw.train;
        let reward_ft = reward_ft::plan(path, &t.method, raw.reward_ft.as_ref(), &raw.reward)?;
        let method_name = if reward_ft.is_some() { "dpo" } else { &t.method };
        let method = Method::parse(method_name, t.inversion_steps).map_err(|_| {
            err(
                "train.method",
                format!(
                    "expected one of dpo, dcpo, mapo, smpo, kto, npo, {}, got {:?}",
                    reward_ft::REWARD_METHODS.join(", "),
                    t.method
                ),
            )
        })?;
        let mut loss_type = t
            .loss_type
            .parse::<LossType>()
            .map_err(|e| err("train.loss_type", e.to_string()))?;
        if let Some(g) = t.simpo_gamma {
            loss_type = loss_type
                .with_simpo_gamma(g)
                .map_err(|e| err("train.simpo_gamma", e.to_string()))?;
        }
        if let Some(tau) = t.discopop_tau {
            loss_type = loss_type
                .with_discopop_tau(tau)
                .map_err(|e| err("train.discopop_tau", e.to_string()))?;
        }
        // Unpaired data has single images: NPO trains KTO's objective on them, labels swapped.
        let unpaired = raw.data.unpaired;
        if unpaired && !matches!(method, Method::Kto | Method::Npo) {
            return Err(err(
                "data.unpaired",
                format!("applies to the kto and npo methods, got {:?}", t.method),
            ));
        }
        if unpaired && raw.lora.as_ref().is_some_and(|l| l.text_encoder) {
            return Err(err(
                "lora.text_encoder",
                "unpaired data trains the UNet only (the KTO reference has no text-encoder adapters to switch off)"
                    .into(),
            ));
        }
        let objective_method = if unpaired { Method::Kto } else { method };
        let objective =
            Objective::for_method(objective_method, t.beta, loss_type, t.label_smoothing).map_err(|e| match e {
                Error::Input { what, reason } => err(&format!("train.{what}"), format!("{what}: {reason}")),
                other => other,
            })?;
        let kto = KtoSettings {
            kto_lambda_d: t.kto_lambda_d,
            kto_lambda_u: t.kto_lambda_u,
            halo: t.halo.clone(),
        };
        let objective = kto
            .apply(objective_method == Method::Kto, objective)
            .map_err(|e| match e {
                Error::Input { what, reason } => err(&format!("train.{what}"), reason),
                other => other,
            })?;
        let positive = [
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.resolution", t.resolution),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(err(key, "must be > 0, got 0".into()));
            }
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(err("train.lr", format!("must be > 0, got {}", t.lr)));
        }
        if !(0.0..=1.0).contains(&t.empty_caption_prob) {
            return Err(err(
                "train.empty_caption_prob",
                format!("must be in [0, 1], got {}", t.empty_caption_prob),
            ));
        }
        if t.max_grad_norm < 0.0 {
            return Err(err(
                "train.max_grad_norm",
                format!("must be >= 0, got {}", t.max_grad_norm),
            ));
        }
        if t.adam.is_some() && t.optimizer.is_some() {
            return Err(err(
                "train.adam",
                "give the optimizer's settings in [train.optimizer] or AdamW's in [train.adam], not both".into(),
            ));
        }
        t.optimizer_config().validate().map_err(|e| match e {
            Error::Input { what, reason } => {
                let table = if t.adam.is_some() { "adam" } else { "optimizer" };
                err(&format!("train.{table}.{what}"), reason)
            }
            other => other,
        })?;
        let dtype = crate::device::parse_dtype(&raw.model.dtype).map_err(|e| err("model.dtype", e.to_string()))?;
        if let Some(l) = &raw.lora {
            if l.rank == 0 {
                return Err(err("lora.rank", "must be > 0, got 0".into()));
            }
            if l.targets.is_empty() {
                return Err(err("lora.targets", "must name at least one module".into()));
            }
            if l.text_encoder && l.text_encoder_targets.is_empty() {
                return Err(err("lora.text_encoder_targets", "must name at least one module".into()));
            }
            if let Some(te_lr) = l.text_encoder_lr {
                if !l.text_encoder {
                    return Err(err("lora.text_encoder_lr", "needs text_encoder = true".into()));
                }
                if !(te_lr.is_finite() && te_lr >= 0.0) {
                    return Err(err("lora.text_encoder_lr", format!("must be >= 0, got {te_lr}")));
                }
            }
        }
        if raw.output.validation_seeds.is_empty() && !raw.output.validation_prompts.is_empty() {
            return Err(err(
                "output.validation_seeds",
                "must not be empty when there are validation prompts".into(),
            ));
        }
        Ok(Plan {
            source: path.to_path_buf(),
            raw,
            method,
            objective,
            dtype,
            resolved_toml,
            reward_ft,
        })
    }
}

//! `AutoencoderKL`, Stable Diffusion's VAE: images to a diagonal Gaussian over latents and back.
//! Counterpart: `diffusers/models/autoencoders/autoencoder_kl.py`.
//! Images are `[B, 3, H, W]` in [-1, 1]; latents `[B, latent_channels, H/f, W/f]` with
//! `f = 2^(levels - 1)`; the pipeline multiplies latents by `scaling_factor` after encoding and
//! divides before decoding.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use super::vae::{CoderConfig, Decoder, Encoder};
use crate::models::config::{from_diffusers_folder, read_config, unknown_keys};
use crate::nn::conv::Conv2dConfig;
use crate::nn::{Activation, Conv2d};
use crate::rng::Rng;
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn silu() -> Activation {
    Activation::Silu
}
fn groups() -> usize {
    32
}
fn channels() -> Vec<usize> {
    vec![64]
}
fn down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// The diffusers `AutoencoderKL` config, keys verbatim, defaults as diffusers' constructor.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Encoder block kinds (only `DownEncoderBlock2D`).
    #[serde(default = "down_types")]
    pub down_block_types: Vec<String>,
    /// Decoder block kinds (only `UpDecoderBlock2D`).
    #[serde(default = "up_types")]
    pub up_block_types: Vec<String>,
    /// Channels per level.
    #[serde(default = "channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level.
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Nonlinearity.
    #[serde(default = "silu")]
    pub act_fn: Activation,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Group-norm groups.
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (SD 1.x/2.x 0.18215, SDXL 0.13025).
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3-style VAEs); must be null here.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Whether diffusers runs this VAE in f32 even in half-precision pipelines.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// Keys this implementation does not read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl AutoencoderKLConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(path)
    }

    /// Config keys this implementation does not read (for a warning).
    pub fn unknown_keys(&self) -> Vec<String> {
        unknown_keys(&self.extra)
            .into_iter()
            .filter(|k| !matches!(k.as_str(), "sample_size" | "latents_mean" | "latents_std"))
            .collect()
    }

    /// The spatial factor between images and latents.
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn validate(&self, file: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::config(file, "block_out_channels", "must not be empty"));
        }
        for (key, types, want) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(Error::config(
                    file,
                    key,
                    format!("must have {n} entries (as block_out_channels), got {}", types.len()),
                ));
            }
            if let Some(t) = types.iter().find(|t| *t != want) {
                return Err(Error::config(
                    file,
                    key,
                    format!("unsupported block type {t:?} (supported: {want})"),
                ));
            }
        }
        if let Some(s) = self.shift_factor {
            return Err(Error::config(
                file,
                "shift_factor",
                format!("value {s} is not supported"),
            ));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(Error::config(
                file,
                "norm_num_groups",
                format!("{} groups do not divide {c} channels", self.norm_num_groups),
            ));
        }
        Ok(())
    }
}

/// The encoder's output distribution over latents.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// Mean, `[B, latent, h, w]`.
    pub mean: Tensor,
    /// Standard deviation, `exp(0.5 * clamp(logvar, -30, 20))`.
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `mean + std * noise` with noise from `rng`.
    pub fn sample(&self, rng: &mut Rng) -> Result<Tensor> {
        let noise = rng
            .randn(self.mean.dims(), self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (&self.std * noise)?)?)
    }
}

/// The VAE.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
    dtype: candle_core::DType,
    recompute: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AutoencoderKL {
    /// Builds the VAE from `cfg` (read from `config_file`, named in errors) and weights `vb`.
    pub fn new(cfg: &AutoencoderKLConfig, config_file: &Path, vb: VarBuilder) -> Result<Self> {
        cfg.validate(config_file)?;
        let coder = CoderConfig {
            block_out_channels: cfg.block_out_channels.clone(),
            layers_per_block: cfg.layers_per_block,
            norm_num_groups: cfg.norm_num_groups,
            act: cfg.act_fn,
            mid_block_add_attention: cfg.mid_block_add_attention,
        };
        let l = cfg.latent_channels;
        let one_by_one = Conv2dConfig::default();
        Ok(AutoencoderKL {
            encoder: Encoder::new(cfg.in_channels, l, &coder, vb.pp("encoder"))?,
            decoder: Decoder::new(l, cfg.out_channels, &coder, vb.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(2 * l, 2 * l, 1, one_by_one, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(l, l, 1, one_by_one, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            config: cfg.clone(),
            dtype: vb.dtype(),
            recompute: vb.recompute_flag(),
        })
    }

    /// Turns activation recomputation by block on or off (diffusers'
    /// `enable_gradient_checkpointing`): every resnet block then keeps only its
    /// output and runs again in the backward pass, trading one extra forward for memory.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.recompute.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Loads a diffusers `vae/` folder; every checkpoint tensor must be used.
    pub fn from_pretrained(dir: &Path, opts: &LoadOptions) -> Result<(Self, VarBuilder)> {
        from_diffusers_folder(dir, opts, AutoencoderKLConfig::from_file, Self::new)
    }

    /// The dtype of the weights (inputs are expected in it).
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype
    }

    /// The config the model was built from.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Encodes images in [-1, 1] to the latent distribution (unscaled latents).
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let h = self.encoder.forward(images)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h)?,
            None => h,
        };
        let parts = moments.chunk(2, 1)?;
        let logvar = parts[1].clamp(-30f32, 20f32)?;
        Ok(DiagonalGaussian {
            mean: parts[0].clone(),
            std: (logvar * 0.5)?.exp()?,
        })
    }

    /// Decodes unscaled latents (divide the pipeline's latents by `scaling_factor` first) to
    /// images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}

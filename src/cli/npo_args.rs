//! `--npo-lora FILE [--npo-weight W]`: Diffusion-NPO's negative-preference adapter in guidance.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::weights::lora::LoraSource;
use diffalign::weights::LoadOptions;

use super::model_args::ModelArgs;

/// Flags of Diffusion-NPO guidance.
#[derive(Debug, Args)]
pub struct NpoArgs {
    /// Diffusion-NPO: a negative-preference LoRA (trained with `method = "npo"`) on the model's
    /// UNet that predicts guidance's negative branch; `--lora`, if given, adapts the other one.
    #[arg(long)]
    npo_lora: Option<PathBuf>,
    /// Weight of the NPO adapter (its scale times W; 0 is plain guidance).
    #[arg(long, default_value_t = 1.0)]
    npo_weight: f64,
}

impl NpoArgs {
    /// The negative branch's UNet: the model's UNet with the NPO adapter at its weight.
    pub fn load(&self, model: &ModelArgs) -> anyhow::Result<Option<UNet2DConditionModel>> {
        let Some(path) = &self.npo_lora else {
            if self.npo_weight != 1.0 {
                anyhow::bail!("--npo-weight: needs --npo-lora");
            }
            return Ok(None);
        };
        if !self.npo_weight.is_finite() {
            anyhow::bail!("--npo-weight: must be finite, got {}", self.npo_weight);
        }
        let (root, opts) = model.resolve()?;
        let dir = model.unet.clone().unwrap_or_else(|| root.join("unet"));
        let source = LoraSource::from_file(path, "unet", false)
            .context("--npo-lora")?
            .with_weight(self.npo_weight);
        let opts = LoadOptions {
            lora: Some(Arc::new(source)),
            ..opts.without_lora()
        };
        let (unet, _) = UNet2DConditionModel::from_pretrained(&dir, &opts)
            .with_context(|| format!("--npo-lora: loading {} with {}", dir.display(), path.display()))?;
        Ok(Some(unet))
    }
}

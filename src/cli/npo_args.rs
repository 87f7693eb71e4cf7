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
    /// Diffusion-NPO: a negative-preference LoRA (trained with `method = "npo"`) that predicts
    /// guidance's negative branch with the model's UNet (and its `--lora`, as the official code).
    #[arg(long)]
    npo_lora: Option<PathBuf>,
    /// Weight of the NPO adapter (its scale times W; 0 is plain guidance).
    #[arg(long, default_value_t = 1.0)]
    npo_weight: f64,
}

impl NpoArgs {
    /// The negative branch's UNet: the model's UNet with its `--lora` and the NPO adapter at its
    /// weight.
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
        let mut source = LoraSource::from_file(path, "unet", false)
            .context("--npo-lora")?
            .with_weight(self.npo_weight);
        // The official code's negative branch is the positive model (its LoRA included) plus
        // the NPO adapter.
        let positive = opts
            .lora
            .as_ref()
            .and_then(|l| std::iter::once(l).chain(l.others()).find(|s| s.component() == "unet"));
        if let Some(positive) = positive {
            source = source
                .stacked_with(positive.clone())
                .context("--npo-lora with --lora")?;
        }
        let opts = LoadOptions {
            lora: Some(Arc::new(source)),
            ..opts.without_lora()
        };
        let (unet, _) = UNet2DConditionModel::from_pretrained(&dir, &opts)
            .with_context(|| format!("--npo-lora: loading {} with {}", dir.display(), path.display()))?;
        Ok(Some(unet))
    }
}

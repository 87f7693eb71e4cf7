//! BLIP's image encoder (Li et al. 2022, arXiv 2201.12086), as ImageReward ships it
//! (`ImageReward/models/BLIP/vit.py`, `VisionTransformer`, timm-style): a stride-p patch
//! convolution with bias, a class token, learned positions, pre-norm blocks (fused qkv with bias,
//! exact GELU MLP, LayerNorm eps 1e-6) and a final LayerNorm. No dropout or drop-path at inference.
//!
//! Input `pixel_values` `[B, 3, S, S]`, already normalised; output the image tokens
//! `[B, 1 + (S/p)^2, D]` after the final norm (what the text encoder cross-attends to).
//! The blocks are CLIP's encoder in its BLIP key layout ([`ClipKeyLayout::Blip`]), with the same
//! per-block activation recomputation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

use super::config::{BlipVisionConfig, VIT_LAYER_NORM_EPS};
use crate::models::clip::encoder::{ClipEncoder, ClipKeyLayout};
use crate::models::clip::vision_model::patch_embed;
use crate::nn::LayerNorm;
use crate::weights::VarBuilder;
use crate::{Error, Result};

/// BLIP's `VisionTransformer` (`visual_encoder`).
#[derive(Debug, Clone)]
pub struct BlipVisionTransformer {
    /// `[D, 3 * p * p]`: `patch_embed.proj.weight` flattened.
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: ClipEncoder,
    norm: LayerNorm,
    config: BlipVisionConfig,
    recompute: Arc<AtomicBool>,
}

impl BlipVisionTransformer {
    /// Builds the tower from `vb` at `visual_encoder`.
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let positions = cfg.grid_size() * cfg.grid_size() + 1;
        let proj = vb.pp("patch_embed").pp("proj");
        Ok(BlipVisionTransformer {
            patch_weight: proj.get(&[d, 3, p, p], "weight")?.reshape((d, 3 * p * p))?,
            patch_bias: proj.get(&[d], "bias")?,
            cls_token: vb.get(&[1, 1, d], "cls_token")?,
            pos_embed: vb.get(&[1, positions, d], "pos_embed")?,
            blocks: ClipEncoder::new(&cfg.encoder(), ClipKeyLayout::Blip, vb.pp("blocks"))?,
            norm: LayerNorm::new(d, VIT_LAYER_NORM_EPS, vb.pp("norm"))?,
            config: *cfg,
            recompute: vb.recompute_flag(),
        })
    }

    /// The sizes the tower was built with.
    pub fn config(&self) -> &BlipVisionConfig {
        &self.config
    }

    /// Turns activation recomputation by block on or off.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.recompute.store(on, Ordering::Relaxed);
    }

    /// The image tokens `[B, 1 + (S/p)^2, D]` of `pixel_values` `[B, 3, S, S]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (s, p, d) = (self.config.image_size, self.config.patch_size, self.config.hidden_size);
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s {
            return Err(Error::input(
                "pixel_values",
                format!("expected shape [B, 3, {s}, {s}] (image_size {s}), got {dims:?}"),
            ));
        }
        let b = dims[0];
        let xs = pixel_values.to_dtype(self.patch_weight.dtype())?;
        let patches = patch_embed(&xs, &self.patch_weight, p)?.broadcast_add(&self.patch_bias)?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)?;
        let xs = self.blocks.forward(&xs, None)?;
        self.norm.forward(&xs)
    }
}

//! A whole CLIP model (Radford et al. 2021, arXiv 2103.00020): text tower, vision tower and
//! `logit_scale`, in either of two checkpoint layouts:
//! - transformers' `CLIPModel` (`src/transformers/models/clip/modeling_clip.py`): PickScore,
//!   the LAION and OpenAI CLIPs on the Hub; see [`ClipModel::from_pretrained`];
//! - open_clip's `CLIP` (`src/open_clip/model.py`, state-dict names `visual.*`, `transformer.*`,
//!   `token_embedding`, `positional_embedding`, `ln_final`, `text_projection`): HPSv2; see
//!   [`ClipModel::from_open_clip`] and [`OpenClipConfig`].
//!
//! Both towers are differentiable; [`ClipModel::get_image_features`] maps `pixel_values`
//! `[B, 3, S, S]` to `[B, projection_dim]`, [`ClipModel::get_text_features`] maps token ids
//! `[B, L]` to `[B, projection_dim]` (neither normalised).

use std::path::Path;

use candle_core::Tensor;

pub use super::open_clip::{OpenClipConfig, OpenClipTextCfg, OpenClipTextModel, OpenClipVisionCfg};
use super::text_model::{is_known_buffer, ClipTextConfig, ClipTextLayout, ClipTextModel};
use super::vision_model::{is_known_vision_buffer, ClipKeyLayout, ClipVisionConfig, ClipVisionModel};
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

/// The text tower of a [`ClipModel`], by checkpoint layout.
#[derive(Debug, Clone)]
pub enum ClipTextTower {
    /// transformers' `CLIPTextModel` body with `text_projection`.
    Transformers(ClipTextModel),
    /// open_clip's text tower.
    OpenClip(OpenClipTextModel),
}

/// A CLIP model: both towers and the learned temperature `logit_scale` (a scalar; the logits
/// are `exp(logit_scale) * cos`).
#[derive(Debug, Clone)]
pub struct ClipModel {
    text: ClipTextTower,
    vision: ClipVisionModel,
    logit_scale: Tensor,
}

/// The tensors of a transformers `CLIPModel` checkpoint that are buffers, not parameters.
fn is_clip_model_buffer(name: &str) -> bool {
    is_known_buffer(name) || is_known_vision_buffer(name)
}

impl ClipModel {
    /// Builds a transformers `CLIPModel` from `vb` at the checkpoint root (`text_model.*`,
    /// `text_projection.weight`, `vision_model.*`, `visual_projection.weight`, `logit_scale`).
    pub fn new(text_cfg: &ClipTextConfig, vision_cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        if !text_cfg.architecture.has_projection() {
            return Err(Error::config(
                &text_cfg.source,
                "architectures",
                "a CLIPModel text tower needs text_projection; read the config with \
                 ClipTextConfig::from_clip_model_file",
            ));
        }
        Ok(ClipModel {
            text: ClipTextTower::Transformers(ClipTextModel::new(text_cfg, ClipTextLayout::Prefixed, vb.clone())?),
            vision: ClipVisionModel::new(vision_cfg, ClipKeyLayout::Transformers, vb.clone())?,
            logit_scale: vb.get(&[], "logit_scale")?,
        })
    }

    /// Loads a transformers `CLIPModel` folder: `dir/config.json` and `dir/model*.safetensors`;
    /// every tensor must be used (except the `position_ids` buffers of transformers 4). Returns
    /// the model and its builder (whose `vars()` are the trainable parameters when
    /// `opts.trainable`).
    pub fn from_pretrained(dir: &Path, opts: &LoadOptions) -> Result<(Self, VarBuilder)> {
        let config = dir.join("config.json");
        let text_cfg = ClipTextConfig::from_clip_model_file(&config)?;
        let vision_cfg = ClipVisionConfig::from_file(&config)?;
        let vb = opts.open(dir, "model")?;
        let model = Self::new(&text_cfg, &vision_cfg, vb.clone())?;
        crate::weights::check_all_used(&vb, is_clip_model_buffer)?;
        Ok((model, vb))
    }

    /// Builds an open_clip `CLIP` from `vb` at the state dict's root.
    pub fn new_open_clip(cfg: &OpenClipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(ClipModel {
            text: ClipTextTower::OpenClip(OpenClipTextModel::new(cfg, vb.clone())?),
            vision: ClipVisionModel::new(&cfg.vision_config(), ClipKeyLayout::OpenClip, vb.clone())?,
            logit_scale: vb.get(&[], "logit_scale")?,
        })
    }

    /// Loads an open_clip model folder as the Hugging Face Hub stores them:
    /// `dir/open_clip_config.json` (see [`OpenClipConfig`]) and
    /// `dir/open_clip_model*.safetensors` (the model's `state_dict()`, open_clip names); every
    /// tensor must be used. Returns the model, its config and its builder.
    pub fn from_open_clip(dir: &Path, opts: &LoadOptions) -> Result<(Self, OpenClipConfig, VarBuilder)> {
        let cfg = OpenClipConfig::from_file(dir.join("open_clip_config.json"))?;
        let vb = opts.open(dir, "open_clip_model")?;
        let model = Self::new_open_clip(&cfg, vb.clone())?;
        crate::weights::check_all_used(&vb, |_| false)?;
        Ok((model, cfg, vb))
    }

    /// The projected text features `[B, projection_dim]` for `input_ids` `[B, L]`.
    pub fn get_text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        match &self.text {
            ClipTextTower::Transformers(m) => Ok(m
                .forward(input_ids)?
                .text_embeds
                .expect("a CLIPModel text tower has a projection")),
            ClipTextTower::OpenClip(m) => m.forward(input_ids),
        }
    }

    /// The projected image features `[B, projection_dim]` for `pixel_values` `[B, 3, S, S]`.
    pub fn get_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(pixel_values)?.image_embeds)
    }

    /// The vision tower.
    pub fn vision(&self) -> &ClipVisionModel {
        &self.vision
    }

    /// The text tower.
    pub fn text(&self) -> &ClipTextTower {
        &self.text
    }

    /// The raw learned temperature (logits use its exponential), a scalar tensor.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }
}

//! The LAION aesthetic predictor v2 (<https://github.com/christophschuhmann/improved-aesthetic-predictor>,
//! `simple_inference.py`; ReNO `rewards/aesthetic.py`): a linear MLP on the L2-normalised CLIP
//! ViT-L/14 image embedding, predicting a 1-10 rating (≈ 5-7 for typical images).
//!
//! The MLP is `nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
//! Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))`: no activations, so its
//! parameters sit at `layers.{0,2,4,6,7}`. Widths are read from the checkpoint; the first must be
//! the CLIP projection width. Dropout is inactive at inference.

use std::path::Path;

use candle_core::Tensor;

use super::preprocess::ClipPreprocess;
use super::{l2_normalize, ImageReward, RewardKind};
use crate::models::clip::vision_model::ClipVisionModel;
use crate::nn::Linear;
use crate::weights::{LoadOptions, TensorStore, VarBuilder};
use crate::{Error, Result};

/// Indices of the `Linear` layers of the predictor's `nn.Sequential`.
const LINEAR_INDICES: [usize; 5] = [0, 2, 4, 6, 7];

/// The predictor head: five `Linear` layers without activations, `[B, D]` to `[B, 1]`. ImageReward's
/// head (`ImageReward.py`, `MLP`) is the same module under `mlp.layers`.
#[derive(Debug, Clone)]
pub struct AestheticMlp {
    layers: Vec<Linear>,
}

impl AestheticMlp {
    /// Loads `layers.{0,2,4,6,7}.{weight,bias}` from `vb`: the hidden widths are read from the
    /// checkpoint (random weights: 1024, 128, 64, 16); the first layer must take `in_features`
    /// and the last give 1.
    pub fn new(in_features: usize, vb: VarBuilder) -> Result<Self> {
        let store = vb.store();
        let mut width = in_features;
        let mut layers = Vec::with_capacity(LINEAR_INDICES.len());
        for (n, i) in LINEAR_INDICES.into_iter().enumerate() {
            let lvb = vb.pp("layers").pp(i);
            let out = if n + 1 == LINEAR_INDICES.len() {
                1
            } else {
                match store {
                    // A missing or malformed tensor is reported by `Linear::new`'s shape check.
                    Some(s) => s
                        .shape(&lvb.path("weight"))
                        .and_then(|shape| shape.first().copied())
                        .unwrap_or(0),
                    None => [1024, 128, 64, 16][n],
                }
            };
            layers.push(Linear::new(width, out, true, lvb)?);
            width = out;
        }
        Ok(AestheticMlp { layers })
    }

    /// The rating `[B]` of normalised embeddings `[B, D]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs.squeeze(1)?)
    }
}

/// The aesthetic reward: CLIP image tower, normalisation, [`AestheticMlp`]. The prompt is not used.
pub struct AestheticReward {
    clip: ClipVisionModel,
    mlp: AestheticMlp,
    preprocess: ClipPreprocess,
}

impl AestheticReward {
    /// Loads a folder holding
    /// - `clip/`: a transformers `CLIPModel` (or `CLIPVisionModelWithProjection`) folder, e.g.
    ///   `openai/clip-vit-large-patch14` (the OpenAI ViT-L/14 the predictor was trained on);
    ///   only the image tower is read; its `preprocessor_config.json`, when present, gives the
    ///   normalisation mean and std;
    /// - `aesthetic.safetensors`: the predictor's `state_dict` (`layers.{0,2,4,6,7}.{weight,bias}`),
    ///   e.g. `sac+logos+ava1-l14-linearMSE.pth` converted with
    ///   `safetensors.torch.save_file(torch.load(p), "aesthetic.safetensors")`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let (clip, preprocess) = super::pair_head::load_clip_tower(&dir.join("clip"), opts)?;
        let file = dir.join("aesthetic.safetensors");
        if !file.is_file() {
            return Err(Error::MissingFile {
                path: file,
                what: "the aesthetic predictor weights".into(),
            });
        }
        let vb = opts.var_builder(TensorStore::open_file(&file)?);
        let mlp = AestheticMlp::new(clip.config().projection_dim, vb.clone())?;
        crate::weights::check_all_used(&vb, |_| false)?;
        Ok(AestheticReward { clip, mlp, preprocess })
    }

    /// The CLIP image tower.
    pub fn clip(&self) -> &ClipVisionModel {
        &self.clip
    }

    /// The predictor head.
    pub fn mlp(&self) -> &AestheticMlp {
        &self.mlp
    }
}

impl ImageReward for AestheticReward {
    fn kind(&self) -> RewardKind {
        RewardKind::Aesthetic
    }

    fn set_gradient_checkpointing(&self, on: bool) {
        self.clip.set_gradient_checkpointing(on);
    }

    fn score(&self, images: &Tensor, _prompt: &str) -> Result<Tensor> {
        let w = self.mlp.layers[0].weight();
        let images = images.to_device(w.device())?.to_dtype(w.dtype())?;
        let pixel_values = self.preprocess.forward(&images)?;
        let embeds = l2_normalize(&self.clip.forward(&pixel_values)?.image_embeds)?;
        self.mlp.forward(&embeds)
    }
}

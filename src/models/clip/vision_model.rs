//! The CLIP vision tower (Radford et al. 2021, arXiv 2103.00020), as transformers'
//! `src/transformers/models/clip/modeling_clip.py` (`CLIPVisionTransformer` plus the
//! `visual_projection` of `CLIPModel` / `CLIPVisionModelWithProjection`) and as open_clip's
//! `VisionTransformer` (`src/open_clip/transformer.py`, token pooling, no attentional pooler),
//! differentiable end to end (our own [`LayerNorm`], softmax and activations, see `crate::nn`).
//!
//! Input: `pixel_values` `[B, C, S, S]`, already resized and normalised, with `S` the config's
//! `image_size`. Output ([`ClipVisionOutput`]): `last_hidden_state` `[B, 1 + (S/p)^2, D]` (no
//! post layer norm, as transformers returns it), `pooler_output` `[B, D]`
//! (`post_layernorm` of the class token) and `image_embeds` `[B, projection_dim]`.
//!
//! The transformer stack is the one of the text towers ([`ClipEncoder`], without a mask), in either
//! key layout ([`ClipKeyLayout`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;

pub use super::config::{ClipEncoderConfig, ClipVisionConfig};
use super::encoder::Projection;
pub use super::encoder::{ClipEncoder, ClipKeyLayout};
use crate::nn::{LayerNorm, Linear};
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

/// Whether `name` is a known non-parameter buffer of a transformers CLIP vision checkpoint:
/// `vision_model.embeddings.position_ids` (saved by transformers 4).
pub fn is_known_vision_buffer(name: &str) -> bool {
    name == "vision_model.embeddings.position_ids"
}

/// A stride-`p`, kernel-`p` convolution without bias as a matmul on non-overlapping patches, each
/// flattened as (channel, row, column) like the kernel: `xs` `[B, C, S, S]` and `weight`
/// `[D, C * p * p]` give `[B, (S/p)^2, D]`, patches in row-major order.
pub(crate) fn patch_embed(xs: &Tensor, weight: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, s, _) = xs.dims4()?;
    let (g, d) = (s / p, weight.dim(0)?);
    let patches = xs
        .reshape((b, c, g, p, g, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b * g * g, c * p * p))?;
    let gemm = crate::nn::gemm_dtype(&patches);
    Ok(patches
        .to_dtype(gemm)?
        .matmul(&weight.to_dtype(gemm)?.t()?)?
        .to_dtype(xs.dtype())?
        .reshape((b, g * g, d))?)
}

/// What the vision tower computes for `pixel_values` `[B, C, S, S]`.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// The last encoder layer's output, `[B, 1 + (S/p)^2, D]` (class token first, no post norm).
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the class token, `[B, D]`.
    pub pooler_output: Tensor,
    /// The projected pooled state, `[B, projection_dim]`.
    pub image_embeds: Tensor,
}

/// The CLIP vision tower with its projection.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    /// `[D, C * p * p]`: the patch convolution (no bias, stride = kernel = p) as a matrix.
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    visual_projection: Projection,
    config: ClipVisionConfig,
    recompute: Arc<std::sync::atomic::AtomicBool>,
}

impl ClipVisionModel {
    /// Builds the tower from `vb` at the checkpoint root, in the given key layout
    /// (transformers: under `vision_model.` plus `visual_projection.weight`; open_clip: under
    /// `visual.`). Does not audit unused tensors (the caller owns the whole checkpoint).
    pub fn new(cfg: &ClipVisionConfig, layout: ClipKeyLayout, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let positions = cfg.grid_size() * cfg.grid_size() + 1;
        let eps = cfg.layer_norm_eps;
        let (patch, class_embedding, position_embedding, pre, encoder_vb, post, projection) = match layout {
            ClipKeyLayout::Transformers => {
                let body = vb.pp("vision_model");
                let emb = body.pp("embeddings");
                (
                    emb.pp("patch_embedding").get(&[d, c, p, p], "weight")?,
                    emb.get(&[d], "class_embedding")?,
                    emb.pp("position_embedding").get(&[positions, d], "weight")?,
                    LayerNorm::new(d, eps, body.pp("pre_layrnorm"))?,
                    body.pp("encoder").pp("layers"),
                    LayerNorm::new(d, eps, body.pp("post_layernorm"))?,
                    Projection::Linear(Linear::new(d, cfg.projection_dim, false, vb.pp("visual_projection"))?),
                )
            }
            ClipKeyLayout::OpenClip => {
                let body = vb.pp("visual");
                (
                    body.pp("conv1").get(&[d, c, p, p], "weight")?,
                    body.get(&[d], "class_embedding")?,
                    body.get(&[positions, d], "positional_embedding")?,
                    LayerNorm::new(d, eps, body.pp("ln_pre"))?,
                    body.pp("transformer").pp("resblocks"),
                    LayerNorm::new(d, eps, body.pp("ln_post"))?,
                    Projection::Matrix(body.get(&[d, cfg.projection_dim], "proj")?),
                )
            }
            ClipKeyLayout::Blip => {
                return Err(Error::input(
                    vb.path(""),
                    "BLIP's vision transformer is models::blip::vit, not a CLIP tower",
                ))
            }
        };
        Ok(ClipVisionModel {
            patch_embedding: patch.reshape((d, c * p * p))?,
            class_embedding,
            position_embedding,
            pre_layrnorm: pre,
            encoder: ClipEncoder::new(&cfg.encoder(), layout, encoder_vb)?,
            post_layernorm: post,
            visual_projection: projection,
            config: cfg.clone(),
            recompute: vb.recompute_flag(),
        })
    }

    /// Turns activation recomputation by block on or off (diffusers'
    /// `enable_gradient_checkpointing`): every encoder layer then keeps only its
    /// output and runs again in the backward pass, trading one extra forward for memory.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.recompute.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Loads the image tower of a transformers folder: `dir/config.json` (a `CLIPModel` or
    /// `CLIPVisionModelWithProjection` config) and `dir/model*.safetensors`. A `CLIPModel`'s text
    /// tower (`text_model.*`, `text_projection.weight`) and `logit_scale` are not read; every
    /// other tensor must be used. Returns the model and its builder (whose `vars()` are the
    /// trainable parameters when `opts.trainable`).
    pub fn from_pretrained(dir: &Path, opts: &LoadOptions) -> Result<(Self, VarBuilder)> {
        let cfg = ClipVisionConfig::from_file(dir.join("config.json"))?;
        let vb = opts.open(dir, "model")?;
        let model = Self::new(&cfg, ClipKeyLayout::Transformers, vb.clone())?;
        crate::weights::check_all_used(&vb, |name| {
            is_known_vision_buffer(name)
                || name.starts_with("text_model.")
                || name == "text_projection.weight"
                || name == "logit_scale"
        })?;
        Ok((model, vb))
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Runs the tower on `pixel_values` `[B, C, S, S]` (`S` = `image_size`, already normalised).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let cfg = &self.config;
        let (s, p, c) = (cfg.image_size, cfg.patch_size, cfg.num_channels);
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[1] != c || dims[2] != s || dims[3] != s {
            return Err(Error::input(
                "pixel_values",
                format!("expected shape [B, {c}, {s}, {s}] (image_size {s}), got {dims:?}"),
            ));
        }
        let (b, d) = (dims[0], cfg.hidden_size);
        let xs = pixel_values.to_dtype(self.patch_embedding.dtype())?;
        let patches = patch_embed(&xs, &self.patch_embedding, p)?;
        let class = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let last_hidden_state = self.encoder.forward(&xs, None)?;
        let pooler_output = self
            .post_layernorm
            .forward(&last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?)?;
        let image_embeds = self.visual_projection.forward(&pooler_output)?;
        Ok(ClipVisionOutput {
            last_hidden_state,
            pooler_output,
            image_embeds,
        })
    }
}

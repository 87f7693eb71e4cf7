//! `UNet2DConditionModel`, the denoiser of Stable Diffusion 1.x / 2.x / XL and their Turbo
//! variants, built from the checkpoint's `config.json`.
//! Counterpart: `diffusers/models/unets/unet_2d_condition.py`.
//! Input: latents `[B, C_in, h, w]`, per-sample timesteps `[B]`, text states `[B, L, D]` and,
//! for SDXL (`addition_embed_type: "text_time"`), pooled text embeddings `[B, P]` and time ids
//! `[B, 6]`. Output: `[B, C_out, h, w]` (noise or velocity, per the scheduler's prediction type).

use std::path::Path;

use candle_core::{DType, Tensor};

use super::config::BlockKind;
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::unet_2d_blocks::{BlockAttention, DownBlock, MidBlock, UpBlock, UpChannels};
use crate::models::resnet::ResnetOptions;
use crate::nn::conv::Conv2dConfig;
use crate::nn::{Activation, Conv2d, GroupNorm};
use crate::weights::VarBuilder;
use crate::{Error, Result};

pub use super::config::UNet2DConditionConfig;

/// SDXL's added conditioning (`addition_embed_type: "text_time"`).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled, projected text embeddings of the second encoder, `[B, P]`.
    pub text_embeds: Tensor,
    /// Micro-conditioning `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`, `[B, 6]`.
    pub time_ids: Tensor,
}

/// SDXL's `add_time_proj` + `add_embedding`.
#[derive(Debug, Clone)]
struct TextTimeEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

/// The UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    center_input_sample: bool,
    in_channels: usize,
    cross_attention_dim: usize,
    sample_size: Option<(usize, usize)>,
    dtype: DType,
    device: candle_core::Device,
    recompute: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UNet2DConditionModel {
    /// Builds the model from `cfg` (read from `config_file`, named in errors) and weights `vb`.
    pub fn new(cfg: &UNet2DConditionConfig, config_file: &Path, vb: VarBuilder) -> Result<Self> {
        let plan = cfg.plan(config_file)?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let act = cfg.act_fn;
        let resnet = |scale: f64| ResnetOptions {
            temb_channels: Some(plan.time_embed_dim),
            groups: plan.groups,
            eps: cfg.norm_eps,
            act,
            output_scale_factor: scale,
        };
        let attention = |kind: BlockKind, heads: usize, layers: usize, cross: usize| {
            (kind == BlockKind::CrossAttn).then_some(BlockAttention {
                heads,
                num_layers: layers,
                cross_attention_dim: cross,
                use_linear_projection: cfg.use_linear_projection,
            })
        };

        let conv_in_cfg = Conv2dConfig {
            padding: (cfg.conv_in_kernel - 1) / 2,
            ..Default::default()
        };
        let conv_in = Conv2d::new(
            cfg.in_channels,
            boc[0],
            cfg.conv_in_kernel,
            conv_in_cfg,
            vb.pp("conv_in"),
        )?;
        let time_proj = Timesteps {
            num_channels: boc[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            downscale_freq_shift: cfg.freq_shift,
        };
        let time_embedding = TimestepEmbedding::new(boc[0], plan.time_embed_dim, act, vb.pp("time_embedding"))?;
        let add = match plan.text_time {
            Some((time_dim, proj_dim)) => Some(TextTimeEmbedding {
                add_time_proj: Timesteps {
                    num_channels: time_dim,
                    flip_sin_to_cos: cfg.flip_sin_to_cos,
                    downscale_freq_shift: cfg.freq_shift,
                },
                add_embedding: TimestepEmbedding::new(proj_dim, plan.time_embed_dim, act, vb.pp("add_embedding"))?,
            }),
            None => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch;
            let is_final = i == n - 1;
            let attn = attention(
                plan.down[i],
                plan.heads[i],
                plan.transformer_layers[i],
                plan.cross_dims[i],
            );
            let downsample = (!is_final).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock::new(
                in_ch,
                out_ch,
                plan.layers[i],
                resnet(1.0),
                attn,
                downsample,
                vb.pp("down_blocks").pp(i),
            )?);
        }

        let mid_attn = BlockAttention {
            heads: plan.heads[n - 1],
            num_layers: plan.transformer_layers[n - 1],
            cross_attention_dim: plan.cross_dims[n - 1],
            use_linear_projection: cfg.use_linear_projection,
        };
        let mid_block = MidBlock::new(
            boc[n - 1],
            resnet(cfg.mid_block_scale_factor),
            mid_attn,
            vb.pp("mid_block"),
        )?;

        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = plan.heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = plan.layers.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = plan.cross_dims.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev_boc[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev_boc[i];
            let in_ch = rev_boc[(i + 1).min(n - 1)];
            let attn = attention(
                plan.up[i],
                rev_heads[i],
                plan.reverse_transformer_layers[i],
                rev_cross[i],
            );
            let ch = UpChannels {
                in_channels: in_ch,
                out_channels: out_ch,
                prev_output_channels: prev,
            };
            up_blocks.push(UpBlock::new(
                ch,
                rev_layers[i] + 1,
                resnet(1.0),
                attn,
                i != n - 1,
                vb.pp("up_blocks").pp(i),
            )?);
        }

        let conv_norm_out = GroupNorm::new(plan.groups, boc[0], cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out_cfg = Conv2dConfig {
            padding: (cfg.conv_out_kernel - 1) / 2,
            ..Default::default()
        };
        let conv_out = Conv2d::new(
            boc[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            conv_out_cfg,
            vb.pp("conv_out"),
        )?;
        Ok(UNet2DConditionModel {
            conv_in,
            time_proj,
            time_embedding,
            add,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            act,
            center_input_sample: cfg.center_input_sample,
            in_channels: cfg.in_channels,
            cross_attention_dim: plan.cross_dims[0],
            sample_size: cfg.sample_size_hw(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            recompute: vb.recompute_flag(),
        })
    }

    /// Turns activation recomputation by block on or off (diffusers'
    /// `enable_gradient_checkpointing`): every resnet and transformer block then keeps only its
    /// output and runs again in the backward pass, trading one extra forward for memory.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.recompute.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Whether the model needs [`AddedCond`] (SDXL).
    pub fn needs_added_cond(&self) -> bool {
        self.add.is_some()
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// The latent size the model was trained at, `(h, w)`, from the config's `sample_size`.
    pub fn sample_size(&self) -> Option<(usize, usize)> {
        self.sample_size
    }

    /// Width of the text states the model expects.
    pub fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dim
    }

    /// Predicts the model output for `sample` `[B, C, h, w]` at per-sample `timesteps` `[B]`
    /// (any dtype; fractional values allowed) given text states `[B, L, D]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.dims() != [b] {
            return Err(Error::input(
                "timesteps",
                format!("expected shape [{b}], got {:?}", timesteps.dims()),
            ));
        }
        let dtype = sample.dtype();
        let sample = if self.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };

        let t_emb = self.time_proj.forward(timesteps)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        match (&self.add, added) {
            (Some(add), Some(cond)) => {
                let time_ids = cond.time_ids.flatten_all()?;
                let time_embeds = add.add_time_proj.forward(&time_ids)?.reshape((b, ()))?;
                let add_embeds = Tensor::cat(&[&cond.text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?;
                emb = (emb + add.add_embedding.forward(&add_embeds.to_dtype(dtype)?)?)?;
            }
            (Some(_), None) => {
                return Err(Error::input(
                    "unet",
                    "this UNet uses addition_embed_type \"text_time\" and needs text_embeds and time_ids",
                ))
            }
            (None, _) => {}
        }

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&xs, &emb, encoder_hidden_states)?;
            xs = out;
            skips.extend(states);
        }
        xs = self.mid_block.forward(&xs, &emb, encoder_hidden_states)?;

        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len() - block.num_skips();
            // Upsample to the next skip state's size: equal to 2x unless h or w was odd somewhere.
            let upsample_size = if i + 1 < n_up {
                let (_, _, sh, sw) = skips[remaining - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            xs = block.forward(&xs, &mut skips, &emb, encoder_hidden_states, upsample_size)?;
        }
        debug_assert!(skips.is_empty());
        let xs = self.conv_norm_out.forward_act(&xs, self.act)?;
        let out = self.conv_out.forward(&xs)?;
        debug_assert_eq!(out.dims4()?.2, h);
        debug_assert_eq!(out.dims4()?.3, w);
        Ok(out)
    }
}

impl UNet2DConditionModel {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model*.safetensors` (a diffusers `unet/`
    /// folder); every tensor of the checkpoint must be used. Returns the model and its builder
    /// (whose `vars()` are the trainable parameters when `opts.trainable`).
    pub fn from_pretrained(dir: &Path, opts: &crate::weights::LoadOptions) -> Result<(Self, VarBuilder)> {
        crate::models::config::from_diffusers_folder(dir, opts, UNet2DConditionConfig::from_file, Self::new)
    }
}

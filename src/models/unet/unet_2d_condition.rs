//! `UNet2DConditionModel`, the denoiser of Stable Diffusion 1.x / 2.x / XL and their Turbo
//! variants, built from the checkpoint's `config.json`.
//! Counterpart: `diffusers/models/unets/unet_2d_condition.py`.
//! Input: latents `[B, C_in, h, w]`, per-sample timesteps `[B]`, text states `[B, L, D]` and,
//! for SDXL (`addition_embed_type: "text_time"`), pooled text embeddings `[B, P]` and time ids
//! `[B, 6]`. Output: `[B, C_out, h, w]` (noise or velocity, per the scheduler's prediction type).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::unet_2d_blocks::{BlockAttention, DownBlock, MidBlock, UpBlock, UpChannels};
use crate::models::config::{read_config, unknown_keys, PerBlock};
use crate::models::resnet::ResnetOptions;
use crate::nn::conv::Conv2dConfig;
use crate::nn::{Activation, Conv2d, GroupNorm};
use crate::weights::VarBuilder;
use crate::{Error, Result};

fn default_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_down_blocks() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up_blocks() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_one_usize() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_act() -> Activation {
    Activation::Silu
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_default() -> String {
    "default".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_kernel() -> usize {
    3
}
fn default_false_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}

/// The diffusers `UNet2DConditionModel` config, keys verbatim, defaults as diffusers' constructor.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Latent size the model was trained at (informational).
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    /// Latent channels in.
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Channels out.
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    /// Map the input from [0,1] to [-1,1] first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Cosines before sines in the timestep features.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep features.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block kinds: `DownBlock2D` or `CrossAttnDownBlock2D`.
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    /// Mid block kind: `UNetMidBlock2DCrossAttn`.
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// Up block kinds: `UpBlock2D` or `CrossAttnUpBlock2D`.
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    /// Self-attention replaced by cross-attention (not supported when true).
    #[serde(default = "default_false_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each down block.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    /// Dropout (training only; ignored, as at inference).
    #[serde(default)]
    pub dropout: f64,
    /// Nonlinearity.
    #[serde(default = "default_act")]
    pub act_fn: Activation,
    /// Group-norm groups (`null` is not supported).
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    /// Group-norm epsilon.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Width of the text states, per block or for all.
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention, per down block or for all.
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Transformer blocks per attention of the up blocks (default: the down values reversed).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<PerBlock<usize>>,
    /// Must be null.
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Must be null.
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the number of heads when `num_attention_heads` is null (a diffusers quirk).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// Number of heads per block.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Must be false.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Linear (true) or 1x1-conv (false) transformer projections.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Must be null.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `null` or `"text_time"` (SDXL).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each time-id feature for `text_time`.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Must be null.
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Attention in f32 (we always compute scores in f32).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Must be `"default"`.
    #[serde(default = "default_default")]
    pub resnet_time_scale_shift: String,
    /// Must be false.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Output scale of the resnets.
    #[serde(default = "default_one_f64")]
    pub resnet_out_scale_factor: f64,
    /// Must be `"positional"`.
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    /// Width of the time embedding (default: 4 x the first block's channels).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Must be null.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Must be null.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Must be null.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in`.
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    /// Input width of `add_embedding` for `text_time`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Must be `"default"`.
    #[serde(default = "default_default")]
    pub attention_type: String,
    /// Must be false.
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// Must be null or false.
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Heads of the `text_image` added embedding (unused by the supported `text_time`).
    #[serde(default)]
    pub addition_embed_type_num_heads: Option<usize>,
    /// Must be null.
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// Keys this implementation does not read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Kinds of down and up blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Plain,
    CrossAttn,
}

/// The config, validated and expanded to per-block values.
#[derive(Debug, Clone)]
struct Plan {
    down: Vec<BlockKind>,
    up: Vec<BlockKind>,
    heads: Vec<usize>,
    layers: Vec<usize>,
    cross_dims: Vec<usize>,
    transformer_layers: Vec<usize>,
    reverse_transformer_layers: Vec<usize>,
    groups: usize,
    time_embed_dim: usize,
    text_time: Option<(usize, usize)>,
}

impl UNet2DConditionConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(path)
    }

    /// `sample_size` as `(h, w)` latent pixels, when given as a number or a pair.
    pub fn sample_size_hw(&self) -> Option<(usize, usize)> {
        let v = self.sample_size.as_ref()?;
        if let Some(n) = v.as_u64() {
            return Some((n as usize, n as usize));
        }
        let a = v.as_array()?;
        match (a.first()?.as_u64(), a.get(1)?.as_u64()) {
            (Some(h), Some(w)) if a.len() == 2 => Some((h as usize, w as usize)),
            _ => None,
        }
    }

    /// Config keys this implementation does not read (for a warning).
    pub fn unknown_keys(&self) -> Vec<String> {
        unknown_keys(&self.extra)
    }

    /// Validates the config (errors name `file` and the key) and expands per-block values.
    fn plan(&self, file: &Path) -> Result<Plan> {
        let err = |key: &str, reason: String| Error::config(file, key, reason);
        let unsupported =
            |key: &str, value: &dyn std::fmt::Debug| Err(err(key, format!("value {value:?} is not supported")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(err("block_out_channels", "must not be empty".into()));
        }
        if self.down_block_types.len() != n {
            return Err(err(
                "down_block_types",
                format!(
                    "must have as many entries as block_out_channels ({n}), got {}",
                    self.down_block_types.len()
                ),
            ));
        }
        if self.up_block_types.len() != n {
            return Err(err(
                "up_block_types",
                format!(
                    "must have as many entries as down_block_types ({n}), got {}",
                    self.up_block_types.len()
                ),
            ));
        }
        let kind = |key: &str, s: &str, plain: &str, cross: &str| match s {
            s if s == plain => Ok(BlockKind::Plain),
            s if s == cross => Ok(BlockKind::CrossAttn),
            other => Err(err(
                key,
                format!("unsupported block type {other:?} (supported: {plain}, {cross})"),
            )),
        };
        let down = self
            .down_block_types
            .iter()
            .map(|s| kind("down_block_types", s, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up = self
            .up_block_types
            .iter()
            .map(|s| kind("up_block_types", s, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return unsupported("mid_block_type", &other),
        }
        if self
            .only_cross_attention
            .expand(n, file, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            return unsupported("only_cross_attention", &self.only_cross_attention);
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return unsupported("mid_block_only_cross_attention", &true);
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        if self.class_embed_type.is_some() {
            return unsupported("class_embed_type", &self.class_embed_type);
        }
        if self.num_class_embeds.is_some() {
            return unsupported("num_class_embeds", &self.num_class_embeds);
        }
        if self.class_embeddings_concat {
            return unsupported("class_embeddings_concat", &true);
        }
        if self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some() {
            return unsupported("encoder_hid_dim_type", &self.encoder_hid_dim_type);
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act", &true);
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.time_embedding_act_fn.is_some() {
            return unsupported("time_embedding_act_fn", &self.time_embedding_act_fn);
        }
        if self.timestep_post_act.is_some() {
            return unsupported("timestep_post_act", &self.timestep_post_act);
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim", &self.time_cond_proj_dim);
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", &self.attention_type);
        }
        if self.cross_attention_norm.is_some() {
            return unsupported("cross_attention_norm", &self.cross_attention_norm);
        }
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(err(key, format!("must be odd, got {k}")));
            }
        }
        let groups = self
            .norm_num_groups
            .ok_or_else(|| err("norm_num_groups", "null is not supported".into()))?;
        for &c in &self.block_out_channels {
            if groups == 0 || c % groups != 0 {
                return Err(err(
                    "norm_num_groups",
                    format!("{groups} groups do not divide block_out_channels entry {c}"),
                ));
            }
        }
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads_src = self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim);
        let heads_key = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads = heads_src.expand(n, file, heads_key)?;
        for (i, (&h, &c)) in heads.iter().zip(&self.block_out_channels).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(err(
                    heads_key,
                    format!("block {i}: {h} heads do not divide {c} channels"),
                ));
            }
        }
        let transformer_layers = self
            .transformer_layers_per_block
            .expand(n, file, "transformer_layers_per_block")?;
        let reverse_transformer_layers = match &self.reverse_transformer_layers_per_block {
            Some(r) => r.expand(n, file, "reverse_transformer_layers_per_block")?,
            None => transformer_layers.iter().rev().copied().collect(),
        };
        let time_embed_dim = self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4);
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let t = self
                    .addition_time_embed_dim
                    .ok_or_else(|| err("addition_time_embed_dim", "required for text_time, got null".into()))?;
                let p = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    err(
                        "projection_class_embeddings_input_dim",
                        "required for text_time, got null".into(),
                    )
                })?;
                Some((t, p))
            }
            Some(other) => return unsupported("addition_embed_type", &other),
        };
        Ok(Plan {
            down,
            up,
            heads,
            layers: self.layers_per_block.expand(n, file, "layers_per_block")?,
            cross_dims: self.cross_attention_dim.expand(n, file, "cross_attention_dim")?,
            transformer_layers,
            reverse_transformer_layers,
            groups,
            time_embed_dim,
            text_time,
        })
    }
}

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
        let config_file = dir.join("config.json");
        let cfg = UNet2DConditionConfig::from_file(&config_file)?;
        let vb = opts.open(dir, "diffusion_pytorch_model")?;
        let model = Self::new(&cfg, &config_file, vb.clone())?;
        crate::weights::check_all_used(&vb, |_| false)?;
        Ok((model, vb))
    }
}

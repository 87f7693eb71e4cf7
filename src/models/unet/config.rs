//! The `UNet2DConditionModel` config (`config.json`, keys and defaults as diffusers'
//! constructor) and its validation into a per-block plan the model is built from.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::json::{parse_json, read_text};
use crate::models::config::{unknown_keys, PerBlock};
use crate::nn::Activation;
use crate::{Error, Result};

/// What `config.json` should hold, for errors.
const CONFIG_FILE: &str = "config file";

fn default_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_down_blocks() -> Vec<String> {
    let cross = "CrossAttnDownBlock2D";
    [cross, cross, cross, "DownBlock2D"].map(String::from).to_vec()
}
fn default_up_blocks() -> Vec<String> {
    let cross = "CrossAttnUpBlock2D";
    ["UpBlock2D", cross, cross, cross].map(String::from).to_vec()
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
fn default_variant() -> String {
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
    #[serde(default = "default_variant")]
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
    #[serde(default = "default_variant")]
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
    /// `block_out_channels` was missing from the file read by [`Self::from_file`] (so its
    /// diffusers default stands), for an error that names the missing key.
    #[serde(skip)]
    block_out_channels_defaulted: bool,
}

/// Kinds of down and up blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockKind {
    Plain,
    CrossAttn,
}

/// The config, validated and expanded to per-block values.
#[derive(Debug, Clone)]
pub(super) struct BlockLayout {
    pub(super) down: Vec<BlockKind>,
    pub(super) up: Vec<BlockKind>,
    pub(super) heads: Vec<usize>,
    pub(super) layers: Vec<usize>,
    pub(super) cross_dims: Vec<usize>,
    pub(super) transformer_layers: Vec<usize>,
    pub(super) reverse_transformer_layers: Vec<usize>,
    pub(super) groups: usize,
    pub(super) time_embed_dim: usize,
    pub(super) text_time: Option<(usize, usize)>,
}

impl UNet2DConditionConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        /// The keys whose absence changes which error a mismatch reports.
        #[derive(Deserialize)]
        struct Given {
            block_out_channels: Option<serde::de::IgnoredAny>,
        }
        let text = read_text(path, CONFIG_FILE)?;
        let mut cfg: Self = parse_json(&text, path, CONFIG_FILE)?;
        let given: Given = parse_json(&text, path, CONFIG_FILE)?;
        cfg.block_out_channels_defaulted = given.block_out_channels.is_none();
        Ok(cfg)
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
    pub(super) fn plan(&self, file: &Path) -> Result<BlockLayout> {
        let err = |key: &str, reason: String| Error::config(file, key, reason);
        let unsupported =
            |key: &str, value: &dyn std::fmt::Debug| Err(err(key, format!("value {value:?} is not supported")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(err("block_out_channels", "must not be empty".into()));
        }
        if self.down_block_types.len() != n && self.block_out_channels_defaulted {
            return Err(err(
                "block_out_channels",
                format!(
                    "missing, and its diffusers default has {n} entries while down_block_types has {}",
                    self.down_block_types.len()
                ),
            ));
        }
        for (key, types, like) in [
            ("down_block_types", &self.down_block_types, "block_out_channels"),
            ("up_block_types", &self.up_block_types, "down_block_types"),
        ] {
            if types.len() != n {
                return Err(err(
                    key,
                    format!("must have as many entries as {like} ({n}), got {}", types.len()),
                ));
            }
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
        Ok(BlockLayout {
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

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
//! The transformer block ([`ClipEncoder`]) is shared with open_clip's text tower
//! (`crate::models::clip::clip_model`), and reads either key layout ([`ClipKeyLayout`]):
//! transformers' separate `q_proj`/`k_proj`/`v_proj`, or open_clip's fused `in_proj_weight`.
//! There is no dropout (`attention_dropout` is 0 in every released checkpoint).

use std::sync::Arc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::models::config::read_config;
use crate::nn::checkpoint::Recompute;
use crate::nn::{scaled_dot_product_attention, Activation, LayerNorm, Linear};
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

/// Where a CLIP checkpoint keeps a tower's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipKeyLayout {
    /// transformers' names: `vision_model.embeddings.patch_embedding.weight`,
    /// `encoder.layers.N.self_attn.{q,k,v,out}_proj`, `layer_norm1`, `mlp.fc1`, `mlp.fc2`,
    /// `layer_norm2`, `visual_projection.weight` (a `Linear` without bias).
    Transformers,
    /// open_clip's names: `visual.conv1.weight`, `visual.class_embedding`,
    /// `visual.positional_embedding`, `visual.ln_pre`, `transformer.resblocks.N.{ln_1,
    /// attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
    /// `visual.ln_post` and `visual.proj` (a matrix applied as `x @ proj`).
    OpenClip,
}

/// Sizes and activation of one transformer stack (CLIP's pre-norm encoder).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipEncoderConfig {
    /// Width D of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

/// `x W^T + b` for a weight `[out, in]` and bias `[out]` that are not stored as a `Linear`
/// (open_clip's fused `in_proj_weight`); same dtype handling as [`Linear`].
fn affine(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, l, d) = xs.dims3()?;
    let gemm = crate::nn::gemm_dtype(xs);
    let ys = xs
        .reshape((b * l, d))?
        .to_dtype(gemm)?
        .matmul(&weight.to_dtype(gemm)?.t()?)?
        .to_dtype(xs.dtype())?
        .broadcast_add(bias)?;
    Ok(ys.reshape((b, l, weight.dim(0)?))?)
}

/// The query, key and value projections: three `Linear`s or one fused `[3D, D]` matrix.
#[derive(Debug, Clone)]
enum QkvProjection {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused {
        in_proj_weight: Tensor,
        in_proj_bias: Tensor,
    },
}

/// `self_attn` (transformers) or `attn` (open_clip): multi-head attention.
#[derive(Debug, Clone)]
struct ClipAttention {
    qkv: QkvProjection,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(cfg: &ClipEncoderConfig, layout: ClipKeyLayout, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let qkv = match layout {
            ClipKeyLayout::Transformers => QkvProjection::Separate {
                q_proj: Linear::new(d, d, true, vb.pp("q_proj"))?,
                k_proj: Linear::new(d, d, true, vb.pp("k_proj"))?,
                v_proj: Linear::new(d, d, true, vb.pp("v_proj"))?,
            },
            ClipKeyLayout::OpenClip => QkvProjection::Fused {
                in_proj_weight: vb.get(&[3 * d, d], "in_proj_weight")?,
                in_proj_bias: vb.get(&[3 * d], "in_proj_bias")?,
            },
        };
        Ok(ClipAttention {
            qkv,
            out_proj: Linear::new(d, d, true, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `xs` `[B, L, D]`, `mask` `[L, L]` additive or none.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let (q, k, v) = match &self.qkv {
            QkvProjection::Separate { q_proj, k_proj, v_proj } => {
                (q_proj.forward(xs)?, k_proj.forward(xs)?, v_proj.forward(xs)?)
            }
            QkvProjection::Fused {
                in_proj_weight,
                in_proj_bias,
            } => {
                let qkv = affine(xs, in_proj_weight, in_proj_bias)?;
                (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?)
            }
        };
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let ys = scaled_dot_product_attention(&heads(q)?, &heads(k)?, &heads(v)?, scale, mask)?;
        let ys = ys.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_proj.forward(&ys)
    }
}

/// `mlp`: `fc2(act(fc1(x)))` (open_clip: `c_proj(act(c_fc(x)))`).
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(cfg: &ClipEncoderConfig, layout: ClipKeyLayout, vb: VarBuilder) -> Result<Self> {
        let (fc1, fc2) = match layout {
            ClipKeyLayout::Transformers => ("fc1", "fc2"),
            ClipKeyLayout::OpenClip => ("c_fc", "c_proj"),
        };
        Ok(ClipMlp {
            fc1: Linear::new(cfg.hidden_size, cfg.intermediate_size, true, vb.pp(fc1))?,
            fc2: Linear::new(cfg.intermediate_size, cfg.hidden_size, true, vb.pp(fc2))?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(xs)?)?)
    }
}

/// One pre-norm block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
    recompute: Recompute,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipEncoderConfig, layout: ClipKeyLayout, vb: VarBuilder) -> Result<Self> {
        let (attn, ln1, ln2) = match layout {
            ClipKeyLayout::Transformers => ("self_attn", "layer_norm1", "layer_norm2"),
            ClipKeyLayout::OpenClip => ("attn", "ln_1", "ln_2"),
        };
        let d = cfg.hidden_size;
        let self_attn = ClipAttention::new(cfg, layout, vb.pp(attn))?;
        let layer_norm1 = LayerNorm::new(d, cfg.layer_norm_eps, vb.pp(ln1))?;
        let mlp = ClipMlp::new(cfg, layout, vb.pp("mlp"))?;
        let layer_norm2 = LayerNorm::new(d, cfg.layer_norm_eps, vb.pp(ln2))?;
        Ok(ClipEncoderLayer {
            self_attn,
            layer_norm1,
            mlp,
            layer_norm2,
            recompute: Recompute::new(&vb),
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.recompute.run(self, Self::forward_plain, xs, mask)
    }

    fn forward_plain(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        Ok((&xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?)?)
    }
}

/// A stack of CLIP encoder layers: transformers' `encoder.layers.N` or open_clip's
/// `transformer.resblocks.N`.
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// Loads `cfg.num_hidden_layers` layers from `vb.pp(0)`, `vb.pp(1)`, ... (`vb` points at
    /// `encoder.layers` or `transformer.resblocks`).
    pub fn new(cfg: &ClipEncoderConfig, layout: ClipKeyLayout, vb: VarBuilder) -> Result<Self> {
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(Error::input(
                vb.path("0"),
                format!(
                    "{} attention heads do not divide the width {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, layout, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipEncoder { layers })
    }

    /// Runs every layer on `xs` `[B, L, D]`; `mask` `[L, L]` is added to the attention scores
    /// (the text tower's causal mask) or absent (the vision tower).
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, mask)?;
        }
        Ok(xs)
    }
}

/// Keys of a transformers CLIP vision config that are read but do not change the forward pass.
const IGNORED_KEYS: &[&str] = &[
    "attention_dropout",
    "dropout",
    "initializer_range",
    "initializer_factor",
    "dtype",
    "torch_dtype",
    "model_type",
    "transformers_version",
    "architectures",
];

/// A transformers `CLIPVisionConfig` (the `vision_config` of a `CLIPModel` `config.json`, or
/// the `config.json` of a `CLIPVisionModelWithProjection`), with the projection width. Absent
/// keys take transformers 5's defaults, noted per field.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Width D of the hidden states (default 768).
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer (default 3072).
    pub intermediate_size: usize,
    /// Output width of `visual_projection` (default 512; for a `CLIPModel`, the top-level value).
    pub projection_dim: usize,
    /// Number of encoder layers (default 12).
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size` (default 12).
    pub num_attention_heads: usize,
    /// Input channels (default 3).
    pub num_channels: usize,
    /// Side of the square input in pixels (default 224).
    pub image_size: usize,
    /// Side of one square patch; must divide `image_size` (default 32).
    pub patch_size: usize,
    /// MLP activation (default `quick_gelu`; the LAION ViT-H-14 models use `gelu`).
    pub hidden_act: Activation,
    /// Layer-norm epsilon (default 1e-5).
    pub layer_norm_eps: f64,
    /// Keys this crate does not read, verbatim.
    pub other: BTreeMap<String, serde_json::Value>,
    /// Where the config came from, for error messages.
    pub source: PathBuf,
}

impl Default for ClipVisionConfig {
    /// transformers 5's `CLIPVisionConfig()` defaults.
    fn default() -> Self {
        ClipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            other: BTreeMap::new(),
            source: PathBuf::from("config.json"),
        }
    }
}

impl ClipVisionConfig {
    /// Reads a `config.json`: a `CLIPModel`'s (its `vision_config`, updated by a legacy
    /// `vision_config_dict`, with the top-level `projection_dim`) or a
    /// `CLIPVisionModelWithProjection`'s (the keys at the top level).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_object(read_config(path)?, path)
    }

    /// [`ClipVisionConfig::from_file`] on parsed JSON; `source` names it in errors.
    pub fn from_object(mut top: serde_json::Map<String, serde_json::Value>, source: &Path) -> Result<Self> {
        if !top.contains_key("vision_config") && !top.contains_key("vision_config_dict") {
            if let Some(arch) = top.get("architectures") {
                let known = ["CLIPVisionModelWithProjection"];
                let ok = arch
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| known.contains(&n));
                if !ok {
                    return Err(Error::config(
                        source,
                        "architectures",
                        format!("expected CLIPModel or CLIPVisionModelWithProjection, got {arch}"),
                    ));
                }
            }
            return Self::from_map(top, source.to_path_buf(), "");
        }
        let mut sub = |key: &str| match top.remove(key) {
            None | Some(serde_json::Value::Null) => Ok(serde_json::Map::new()),
            Some(serde_json::Value::Object(m)) => Ok(m),
            Some(v) => Err(Error::config(source, key, format!("expected a JSON object, got {v}"))),
        };
        let mut vision = sub("vision_config")?;
        vision.extend(sub("vision_config_dict")?);
        vision.remove("projection_dim");
        if let Some(v) = top.remove("projection_dim") {
            vision.insert("projection_dim".into(), v);
        }
        Self::from_map(vision, source.to_path_buf(), "vision_config.")
    }

    fn from_map(mut map: serde_json::Map<String, serde_json::Value>, source: PathBuf, prefix: &str) -> Result<Self> {
        let mut cfg = ClipVisionConfig {
            source,
            ..ClipVisionConfig::default()
        };
        macro_rules! read {
            ($($field:ident),* $(,)?) => {$(
                if let Some(v) = map.remove(stringify!($field)) {
                    cfg.$field = serde_json::from_value(v).map_err(|e| {
                        Error::config(&cfg.source, format!("{prefix}{}", stringify!($field)), e.to_string())
                    })?;
                }
            )*};
        }
        read!(
            hidden_size,
            intermediate_size,
            projection_dim,
            num_hidden_layers,
            num_attention_heads,
            num_channels,
            image_size,
            patch_size,
            hidden_act,
            layer_norm_eps,
        );
        for key in IGNORED_KEYS {
            map.remove(*key);
        }
        cfg.other = map.into_iter().collect();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the layer shapes need: positive sizes, heads dividing the width, patches
    /// tiling the image, a positive epsilon.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("projection_dim", self.projection_dim),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(&self.source, key, "must be > 0, got 0"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                &self.source,
                "num_attention_heads",
                format!(
                    "must divide hidden_size ({}), got {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(Error::config(
                &self.source,
                "patch_size",
                format!("must divide image_size ({}), got {}", self.image_size, self.patch_size),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::config(
                &self.source,
                "layer_norm_eps",
                format!("must be > 0, got {}", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    /// Keys of the file that diffalign does not read (`_`-prefixed bookkeeping excluded), sorted.
    pub fn unknown_keys(&self) -> Vec<String> {
        self.other.keys().filter(|k| !k.starts_with('_')).cloned().collect()
    }

    /// Number of patches along one side, `image_size / patch_size`.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The encoder stack's sizes.
    pub fn encoder(&self) -> ClipEncoderConfig {
        ClipEncoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

/// Whether `name` is a known non-parameter buffer of a transformers CLIP vision checkpoint:
/// `vision_model.embeddings.position_ids` (saved by transformers 4).
pub fn is_known_vision_buffer(name: &str) -> bool {
    name == "vision_model.embeddings.position_ids"
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

/// The final projection: transformers' `Linear` `[P, D]` or open_clip's matrix `[D, P]`.
#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Matrix(Tensor),
}

impl Projection {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Projection::Linear(l) => l.forward(xs),
            Projection::Matrix(m) => {
                let gemm = crate::nn::gemm_dtype(xs);
                Ok(xs.to_dtype(gemm)?.matmul(&m.to_dtype(gemm)?)?.to_dtype(xs.dtype())?)
            }
        }
    }
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
        let (b, g, d) = (dims[0], cfg.grid_size(), cfg.hidden_size);
        let xs = pixel_values.to_dtype(self.patch_embedding.dtype())?;
        // A stride-p, kernel-p convolution is a matmul on non-overlapping patches, each flattened
        // as (channel, row, column) like the kernel.
        let patches = xs
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let gemm = crate::nn::gemm_dtype(&patches);
        let patches = patches
            .to_dtype(gemm)?
            .matmul(&self.patch_embedding.to_dtype(gemm)?.t()?)?
            .to_dtype(xs.dtype())?
            .reshape((b, g * g, d))?;
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

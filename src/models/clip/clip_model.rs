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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::text_model::{
    is_known_buffer, pooled_positions, ClipPooling, ClipTextConfig, ClipTextLayout, ClipTextModel,
};
use super::vision_model::{
    is_known_vision_buffer, ClipEncoder, ClipEncoderConfig, ClipKeyLayout, ClipVisionConfig, ClipVisionModel,
};
use crate::models::config::read_config;
use crate::nn::{Activation, LayerNorm};
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

/// open_clip's `CLIPVisionCfg` fields this crate reads (`src/open_clip/model.py`); the defaults
/// are open_clip's.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipVisionCfg {
    /// Side of the square input (default 224).
    pub image_size: usize,
    /// Number of transformer blocks (default 12).
    pub layers: usize,
    /// Width of the hidden states (default 768).
    pub width: usize,
    /// Width of one attention head; `width / head_width` heads (default 64).
    pub head_width: usize,
    /// MLP width over `width` (default 4.0).
    pub mlp_ratio: f64,
    /// Side of one patch (default 16).
    pub patch_size: usize,
}

/// open_clip's `CLIPTextCfg` fields this crate reads; the defaults are open_clip's.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipTextCfg {
    /// Number of positions (default 77).
    pub context_length: usize,
    /// Vocabulary size (default 49408).
    pub vocab_size: usize,
    /// Width of the hidden states (default 512).
    pub width: usize,
    /// Number of attention heads (default 8).
    pub heads: usize,
    /// Number of transformer blocks (default 12).
    pub layers: usize,
    /// MLP width over `width` (default 4.0).
    pub mlp_ratio: f64,
}

/// An open_clip model config: the JSON of `open_clip/model_configs/<name>.json`
/// (`{"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}`), or the Hub's
/// `open_clip_config.json`, which wraps it as `model_cfg` next to `preprocess_cfg`
/// (`{"mean", "std", ...}`). Only the standard CLIP layout is supported: options that change the
/// architecture (layer scale, attentional pooling, timm or Hugging Face towers, custom blocks,
/// other pooling or projection types) are rejected when set to a non-default value.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipConfig {
    /// Width of the joint embedding (both projections' output).
    pub embed_dim: usize,
    /// `x * sigmoid(1.702 x)` instead of exact GELU (default false; ViT-H-14 uses GELU).
    pub quick_gelu: bool,
    /// The image tower.
    pub vision_cfg: OpenClipVisionCfg,
    /// The text tower.
    pub text_cfg: OpenClipTextCfg,
    /// `preprocess_cfg.mean`, when the file has one.
    pub image_mean: Option<[f64; 3]>,
    /// `preprocess_cfg.std`, when the file has one.
    pub image_std: Option<[f64; 3]>,
    /// Keys this crate does not read (dotted paths), verbatim.
    pub other: BTreeMap<String, serde_json::Value>,
    /// Where the config came from, for error messages.
    pub source: PathBuf,
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

/// Keys that must hold their default (or be absent/null): they change the architecture.
const VISION_FIXED: &[(&str, &str)] = &[
    ("ls_init_value", "null"),
    ("attentional_pool", "false"),
    ("no_ln_pre", "false"),
    ("pos_embed_type", "\"learnable\""),
    ("final_ln_after_pool", "false"),
    ("pool_type", "\"tok\""),
    ("act_kwargs", "null"),
    ("norm_kwargs", "null"),
    ("block_type", "null"),
    ("qk_norm", "false"),
    ("scaled_cosine_attn", "false"),
    ("scale_heads", "false"),
    ("scale_attn_inner", "false"),
    ("scale_attn", "false"),
    ("scale_fc", "false"),
    ("timm_model_name", "null"),
];
const TEXT_FIXED: &[(&str, &str)] = &[
    ("ls_init_value", "null"),
    ("embed_cls", "false"),
    ("no_causal_mask", "false"),
    ("final_ln_after_pool", "false"),
    ("pool_type", "\"argmax\""),
    ("proj_bias", "false"),
    ("proj_type", "\"linear\""),
    ("act_kwargs", "null"),
    ("norm_kwargs", "null"),
    ("block_type", "null"),
    ("qk_norm", "false"),
    ("scaled_cosine_attn", "false"),
    ("scale_heads", "false"),
    ("scale_attn_inner", "false"),
    ("scale_attn", "false"),
    ("scale_fc", "false"),
    ("hf_model_name", "null"),
];
/// Keys read and ignored: inference-time no-ops or tokenizer settings.
const OPEN_CLIP_IGNORED: &[&str] = &[
    "patch_dropout",
    "output_tokens",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "pad_id",
    "eos_id",
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
];

impl OpenClipConfig {
    /// Reads an open_clip model config file (see the type's docs).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_object(read_config(path)?, path)
    }

    /// [`OpenClipConfig::from_file`] on parsed JSON; `source` names it in errors.
    pub fn from_object(mut top: JsonMap, source: &Path) -> Result<Self> {
        let err = |key: &str, reason: String| Error::config(source, key, reason);
        let object = |v: serde_json::Value, key: &str| match v {
            serde_json::Value::Object(m) => Ok(m),
            other => Err(err(key, format!("expected a JSON object, got {other}"))),
        };
        let mut other = BTreeMap::new();
        let (mut model, prefix) = match top.remove("model_cfg") {
            Some(v) => {
                let model = object(v, "model_cfg")?;
                if let Some(v) = top.remove("preprocess_cfg") {
                    other.extend(
                        object(v, "preprocess_cfg")?
                            .into_iter()
                            .map(|(k, v)| (format!("preprocess_cfg.{k}"), v)),
                    );
                }
                other.extend(top);
                (model, "model_cfg.")
            }
            None => (top, ""),
        };
        let channel_triple = |key: &str, other: &mut BTreeMap<String, serde_json::Value>| -> Result<Option<[f64; 3]>> {
            match other.remove(key) {
                None => Ok(None),
                Some(v) => serde_json::from_value(v)
                    .map(Some)
                    .map_err(|e| err(key, format!("expected three numbers: {e}"))),
            }
        };
        let image_mean = channel_triple("preprocess_cfg.mean", &mut other)?;
        let image_std = channel_triple("preprocess_cfg.std", &mut other)?;

        fn take<T: serde::de::DeserializeOwned>(
            map: &mut JsonMap,
            key: &str,
            default: T,
            path: &str,
            source: &Path,
        ) -> Result<T> {
            match map.remove(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => {
                    serde_json::from_value(v).map_err(|e| Error::config(source, format!("{path}{key}"), e.to_string()))
                }
            }
        }
        fn check_fixed(map: &mut JsonMap, fixed: &[(&str, &str)], path: &str, source: &Path) -> Result<()> {
            for (key, default) in fixed {
                if let Some(v) = map.remove(*key) {
                    let default: serde_json::Value = serde_json::from_str(default).expect("valid JSON literal");
                    if !v.is_null() && v != default {
                        return Err(Error::config(
                            source,
                            format!("{path}{key}"),
                            format!("only the standard CLIP architecture ({default}) is supported, got {v}"),
                        ));
                    }
                }
            }
            for key in OPEN_CLIP_IGNORED {
                map.remove(*key);
            }
            Ok(())
        }
        let sub = |model: &mut JsonMap, key: &str| -> Result<JsonMap> {
            match model.remove(key) {
                Some(v) => object(v, &format!("{prefix}{key}")),
                None => Err(err(&format!("{prefix}{key}"), "missing".into())),
            }
        };
        let mut vision = sub(&mut model, "vision_cfg")?;
        let mut text = sub(&mut model, "text_cfg")?;
        let embed_dim = match model.remove("embed_dim") {
            Some(v) => serde_json::from_value(v).map_err(|e| err(&format!("{prefix}embed_dim"), e.to_string()))?,
            None => return Err(err(&format!("{prefix}embed_dim"), "missing".into())),
        };
        let quick_gelu = take(&mut model, "quick_gelu", false, prefix, source)?;
        for key in ["custom_text", "cast_dtype", "init_logit_scale", "init_logit_bias"] {
            model.remove(key);
        }

        let vp = format!("{prefix}vision_cfg.");
        let image_size = match vision.remove("image_size") {
            None => 224,
            Some(serde_json::Value::Array(a)) if a.len() == 2 && a[0] == a[1] => {
                serde_json::from_value(a[0].clone()).map_err(|e| err(&format!("{vp}image_size"), e.to_string()))?
            }
            Some(v) => serde_json::from_value(v).map_err(|e| {
                err(
                    &format!("{vp}image_size"),
                    format!("expected one side of a square image: {e}"),
                )
            })?,
        };
        let vision_cfg = OpenClipVisionCfg {
            image_size,
            layers: take(&mut vision, "layers", 12, &vp, source)?,
            width: take(&mut vision, "width", 768, &vp, source)?,
            head_width: take(&mut vision, "head_width", 64, &vp, source)?,
            mlp_ratio: take(&mut vision, "mlp_ratio", 4.0, &vp, source)?,
            patch_size: take(&mut vision, "patch_size", 16, &vp, source)?,
        };
        check_fixed(&mut vision, VISION_FIXED, &vp, source)?;
        let tp = format!("{prefix}text_cfg.");
        let text_cfg = OpenClipTextCfg {
            context_length: take(&mut text, "context_length", 77, &tp, source)?,
            vocab_size: take(&mut text, "vocab_size", 49408, &tp, source)?,
            width: take(&mut text, "width", 512, &tp, source)?,
            heads: take(&mut text, "heads", 8, &tp, source)?,
            layers: take(&mut text, "layers", 12, &tp, source)?,
            mlp_ratio: take(&mut text, "mlp_ratio", 4.0, &tp, source)?,
        };
        check_fixed(&mut text, TEXT_FIXED, &tp, source)?;
        for (path, map) in [(prefix.to_string(), model), (vp, vision), (tp, text)] {
            other.extend(map.into_iter().map(|(k, v)| (format!("{path}{k}"), v)));
        }
        let cfg = OpenClipConfig {
            embed_dim,
            quick_gelu,
            vision_cfg,
            text_cfg,
            image_mean,
            image_std,
            other,
            source: source.to_path_buf(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes: positive, heads dividing widths, patches tiling the image.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        let positive = [
            ("embed_dim", self.embed_dim),
            ("vision_cfg.image_size", v.image_size),
            ("vision_cfg.layers", v.layers),
            ("vision_cfg.width", v.width),
            ("vision_cfg.head_width", v.head_width),
            ("vision_cfg.patch_size", v.patch_size),
            ("text_cfg.context_length", t.context_length),
            ("text_cfg.vocab_size", t.vocab_size),
            ("text_cfg.width", t.width),
            ("text_cfg.heads", t.heads),
            ("text_cfg.layers", t.layers),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(&self.source, key, "must be > 0, got 0"));
            }
        }
        if v.width % v.head_width != 0 {
            return Err(Error::config(
                &self.source,
                "vision_cfg.head_width",
                format!("must divide vision_cfg.width ({}), got {}", v.width, v.head_width),
            ));
        }
        if t.width % t.heads != 0 {
            return Err(Error::config(
                &self.source,
                "text_cfg.heads",
                format!("must divide text_cfg.width ({}), got {}", t.width, t.heads),
            ));
        }
        for (key, ratio) in [
            ("vision_cfg.mlp_ratio", v.mlp_ratio),
            ("text_cfg.mlp_ratio", t.mlp_ratio),
        ] {
            if !(ratio.is_finite() && ratio > 0.0) {
                return Err(Error::config(&self.source, key, format!("must be > 0, got {ratio}")));
            }
        }
        if v.image_size % v.patch_size != 0 {
            return Err(Error::config(
                &self.source,
                "vision_cfg.patch_size",
                format!(
                    "must divide vision_cfg.image_size ({}), got {}",
                    v.image_size, v.patch_size
                ),
            ));
        }
        Ok(())
    }

    /// Keys of the file that diffalign does not read (dotted paths), sorted, for a warning.
    pub fn unknown_keys(&self) -> Vec<String> {
        self.other.keys().cloned().collect()
    }

    fn activation(&self) -> Activation {
        if self.quick_gelu {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        }
    }

    /// The image tower as a [`ClipVisionConfig`] (open_clip's LayerNorm eps is 1e-5; the MLP
    /// width is `int(width * mlp_ratio)`, as open_clip truncates).
    pub fn vision_config(&self) -> ClipVisionConfig {
        let v = &self.vision_cfg;
        ClipVisionConfig {
            hidden_size: v.width,
            intermediate_size: (v.width as f64 * v.mlp_ratio) as usize,
            projection_dim: self.embed_dim,
            num_hidden_layers: v.layers,
            num_attention_heads: v.width / v.head_width,
            num_channels: 3,
            image_size: v.image_size,
            patch_size: v.patch_size,
            hidden_act: self.activation(),
            layer_norm_eps: 1e-5,
            other: BTreeMap::new(),
            source: self.source.clone(),
        }
    }

    fn text_encoder(&self) -> ClipEncoderConfig {
        let t = &self.text_cfg;
        ClipEncoderConfig {
            hidden_size: t.width,
            intermediate_size: (t.width as f64 * t.mlp_ratio) as usize,
            num_hidden_layers: t.layers,
            num_attention_heads: t.heads,
            hidden_act: self.activation(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// open_clip's text tower (`CLIP.encode_text`): token plus positional embeddings, a causal
/// transformer, `ln_final`, the state at the largest id of each row (the end-of-text token),
/// then `@ text_projection` (a `[width, embed_dim]` matrix).
#[derive(Debug, Clone)]
pub struct OpenClipTextModel {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    transformer: ClipEncoder,
    ln_final: LayerNorm,
    text_projection: Tensor,
    device: Device,
}

impl OpenClipTextModel {
    /// Builds the tower from `vb` at the checkpoint root (open_clip names).
    pub fn new(cfg: &OpenClipConfig, vb: VarBuilder) -> Result<Self> {
        let t = &cfg.text_cfg;
        Ok(OpenClipTextModel {
            token_embedding: vb.pp("token_embedding").get(&[t.vocab_size, t.width], "weight")?,
            positional_embedding: vb.get(&[t.context_length, t.width], "positional_embedding")?,
            transformer: ClipEncoder::new(
                &cfg.text_encoder(),
                ClipKeyLayout::OpenClip,
                vb.pp("transformer").pp("resblocks"),
            )?,
            ln_final: LayerNorm::new(t.width, 1e-5, vb.pp("ln_final"))?,
            text_projection: vb.get(&[t.width, cfg.embed_dim], "text_projection")?,
            device: vb.device().clone(),
        })
    }

    /// The projected end-of-text states, `[B, embed_dim]`, for `input_ids` `[B, L]` (u32 or
    /// i64, `L <= context_length`).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (vocab, width) = self.token_embedding.dims2()?;
        let context = self.positional_embedding.dim(0)?;
        let ids = read_ids(input_ids, vocab, context)?;
        let (b, l) = (ids.len(), ids[0].len());
        let flat: Vec<u32> = ids.iter().flatten().map(|&id| id as u32).collect();
        let flat = Tensor::from_vec(flat, b * l, &self.device)?;
        let xs = self
            .token_embedding
            .index_select(&flat, 0)?
            .reshape((b, l, width))?
            .broadcast_add(&self.positional_embedding.narrow(0, 0, l)?)?;
        let mask = causal_mask(l, &self.device)?;
        let xs = self.ln_final.forward(&self.transformer.forward(&xs, Some(&mask))?)?;
        let rows: Vec<u32> = pooled_positions(&ids, ClipPooling::ArgmaxId)
            .into_iter()
            .enumerate()
            .map(|(row, pos)| (row * l + pos) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, &self.device)?;
        let pooled = xs.reshape((b * l, width))?.index_select(&rows, 0)?;
        let gemm = crate::nn::gemm_dtype(&pooled);
        Ok(pooled
            .to_dtype(gemm)?
            .matmul(&self.text_projection.to_dtype(gemm)?)?
            .to_dtype(pooled.dtype())?)
    }
}

/// Checks `input_ids` (rank 2, non-empty, integer, within the vocabulary and the position table)
/// and reads them to the host.
fn read_ids(input_ids: &Tensor, vocab: usize, context: usize) -> Result<Vec<Vec<i64>>> {
    let bad = |reason: String| Error::input("input_ids", reason);
    let (b, l) = input_ids
        .dims2()
        .map_err(|_| bad(format!("expected shape [B, L], got {:?}", input_ids.dims())))?;
    if b == 0 || l == 0 || l > context {
        return Err(bad(format!(
            "expected shape [B, L] with B > 0 and 0 < L <= {context}, got [{b}, {l}]"
        )));
    }
    let ids: Vec<Vec<i64>> = match input_ids.dtype() {
        DType::U32 => input_ids
            .to_vec2::<u32>()?
            .into_iter()
            .map(|r| r.into_iter().map(i64::from).collect())
            .collect(),
        DType::I64 => input_ids.to_vec2::<i64>()?,
        other => return Err(bad(format!("expected dtype u32 or i64, got {other:?}"))),
    };
    if let Some(&id) = ids.iter().flatten().find(|&&id| id < 0 || id >= vocab as i64) {
        return Err(bad(format!("ids must be in 0..{vocab} (vocab_size), got {id}")));
    }
    Ok(ids)
}

/// The additive causal mask `[L, L]` (f32): 0 on and below the diagonal, -inf above.
fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (l, l), device)?)
}

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

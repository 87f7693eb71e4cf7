//! open_clip's CLIP (`src/open_clip/model.py`) as HPSv2 ships it: its model config
//! ([`OpenClipConfig`], translated to the transformers-style [`ClipVisionConfig`] and
//! [`ClipEncoderConfig`]) and its text tower ([`OpenClipTextModel`], state-dict names
//! `token_embedding`, `positional_embedding`, `transformer.resblocks.N`, `ln_final`,
//! `text_projection`). The image tower is [`super::vision_model::ClipVisionModel`] in the
//! [`ClipKeyLayout::OpenClip`] layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::config::{
    check_divides, check_positive, check_positive_real, json_object, take, ClipEncoderConfig, ClipPooling,
    ClipVisionConfig, JsonMap,
};
use super::encoder::{causal_mask, ClipEncoder, ClipKeyLayout, Projection};
use super::text_model::{pool, ClipTextEmbeddings};
use crate::json::read_json;
use crate::nn::{Activation, LayerNorm};
use crate::weights::VarBuilder;
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

/// Keys that must hold their default (or be absent/null) in both towers: they change the
/// architecture of the transformer blocks or of the pooling.
const BLOCK_FIXED: &[(&str, &str)] = &[
    ("ls_init_value", "null"),
    ("final_ln_after_pool", "false"),
    ("act_kwargs", "null"),
    ("norm_kwargs", "null"),
    ("block_type", "null"),
    ("qk_norm", "false"),
    ("scaled_cosine_attn", "false"),
    ("scale_heads", "false"),
    ("scale_attn_inner", "false"),
    ("scale_attn", "false"),
    ("scale_fc", "false"),
];
/// The same, for the image tower only.
const VISION_FIXED: &[(&str, &str)] = &[
    ("attentional_pool", "false"),
    ("no_ln_pre", "false"),
    ("pos_embed_type", "\"learnable\""),
    ("pool_type", "\"tok\""),
    ("timm_model_name", "null"),
];
/// The same, for the text tower only.
const TEXT_FIXED: &[(&str, &str)] = &[
    ("embed_cls", "false"),
    ("no_causal_mask", "false"),
    ("pool_type", "\"argmax\""),
    ("proj_bias", "false"),
    ("proj_type", "\"linear\""),
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
        Self::from_object(read_json(path, "open_clip config")?, path)
    }

    /// [`OpenClipConfig::from_file`] on parsed JSON; `source` names it in errors.
    pub fn from_object(mut top: JsonMap, source: &Path) -> Result<Self> {
        let err = |key: &str, reason: String| Error::config(source, key, reason);
        let object = |v, key: &str| json_object(v, key, source);
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

        /// `key` of `map` (absent or null: `default`); a bad value names `{path}{key}`.
        fn take_or<T: serde::de::DeserializeOwned>(
            map: &mut JsonMap,
            key: &str,
            default: T,
            path: &str,
            source: &Path,
        ) -> Result<T> {
            Ok(take::<Option<T>>(map, key, path, source)?.flatten().unwrap_or(default))
        }
        /// `$ty` with each `key: default` read from `$map` by [`take_or`], and the fields after
        /// `;` from the locals of the same name.
        macro_rules! read_cfg {
            ($map:ident, $path:expr, $source:expr => $ty:ident {
                $($key:ident: $default:expr),* $(; $($given:ident),*)?
            }) => {
                $ty {
                    $($key: take_or(&mut $map, stringify!($key), $default, $path, $source)?,)*
                    $($($given,)*)?
                }
            };
        }
        fn check_fixed(map: &mut JsonMap, fixed: &[(&str, &str)], path: &str, source: &Path) -> Result<()> {
            for (key, default) in fixed.iter().chain(BLOCK_FIXED) {
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
        let embed_dim = take(&mut model, "embed_dim", prefix, source)?
            .ok_or_else(|| err(&format!("{prefix}embed_dim"), "missing".into()))?;
        let quick_gelu = take_or(&mut model, "quick_gelu", false, prefix, source)?;
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
        let vision_cfg = read_cfg! { vision, &vp, source => OpenClipVisionCfg {
            layers: 12, width: 768, head_width: 64, mlp_ratio: 4.0, patch_size: 16; image_size
        }};
        check_fixed(&mut vision, VISION_FIXED, &vp, source)?;
        let tp = format!("{prefix}text_cfg.");
        let text_cfg = read_cfg! { text, &tp, source => OpenClipTextCfg {
            context_length: 77, vocab_size: 49408, width: 512, heads: 8, layers: 12, mlp_ratio: 4.0
        }};
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
        let source = &self.source;
        check_positive(
            source,
            &[
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
            ],
        )?;
        check_divides(
            source,
            ("vision_cfg.head_width", v.head_width),
            ("vision_cfg.width", v.width),
        )?;
        check_divides(source, ("text_cfg.heads", t.heads), ("text_cfg.width", t.width))?;
        check_positive_real(source, "vision_cfg.mlp_ratio", v.mlp_ratio)?;
        check_positive_real(source, "text_cfg.mlp_ratio", t.mlp_ratio)?;
        check_divides(
            source,
            ("vision_cfg.patch_size", v.patch_size),
            ("vision_cfg.image_size", v.image_size),
        )
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
            projection_dim: self.embed_dim,
            num_channels: 3,
            image_size: v.image_size,
            patch_size: v.patch_size,
            source: self.source.clone(),
            ..ClipVisionConfig::default()
        }
        .with_encoder(self.encoder(v.width, v.mlp_ratio, v.layers, v.width / v.head_width))
    }

    fn text_encoder(&self) -> ClipEncoderConfig {
        let t = &self.text_cfg;
        self.encoder(t.width, t.mlp_ratio, t.layers, t.heads)
    }

    /// A tower's transformer stack in open_clip's terms.
    fn encoder(&self, width: usize, mlp_ratio: f64, layers: usize, heads: usize) -> ClipEncoderConfig {
        ClipEncoderConfig {
            hidden_size: width,
            intermediate_size: (width as f64 * mlp_ratio) as usize,
            num_hidden_layers: layers,
            num_attention_heads: heads,
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
    embeddings: ClipTextEmbeddings,
    transformer: ClipEncoder,
    ln_final: LayerNorm,
    text_projection: Projection,
}

impl OpenClipTextModel {
    /// Builds the tower from `vb` at the checkpoint root (open_clip names).
    pub fn new(cfg: &OpenClipConfig, vb: VarBuilder) -> Result<Self> {
        let t = &cfg.text_cfg;
        Ok(OpenClipTextModel {
            embeddings: ClipTextEmbeddings {
                token_embedding: vb.pp("token_embedding").get(&[t.vocab_size, t.width], "weight")?,
                position_embedding: vb.get(&[t.context_length, t.width], "positional_embedding")?,
            },
            transformer: ClipEncoder::new(
                &cfg.text_encoder(),
                ClipKeyLayout::OpenClip,
                vb.pp("transformer").pp("resblocks"),
            )?,
            ln_final: LayerNorm::new(t.width, 1e-5, vb.pp("ln_final"))?,
            text_projection: Projection::Matrix(vb.get(&[t.width, cfg.embed_dim], "text_projection")?),
        })
    }

    /// The projected end-of-text states, `[B, embed_dim]`, for `input_ids` `[B, L]` (u32 or
    /// i64, `L <= context_length`).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (ids, xs) = self.embeddings.forward(input_ids, "context_length")?;
        let mask = causal_mask(ids[0].len(), xs.device())?;
        let xs = self.ln_final.forward(&self.transformer.forward(&xs, Some(&mask))?)?;
        self.text_projection.forward(&pool(&xs, &ids, ClipPooling::ArgmaxId)?)
    }
}

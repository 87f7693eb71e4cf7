//! transformers' CLIP configs (`src/transformers/models/clip/configuration_clip.py`):
//! [`ClipTextConfig`] (`CLIPTextConfig`), [`ClipVisionConfig`] (`CLIPVisionConfig`), both read
//! from a tower's own `config.json` or from the `text_config` / `vision_config` of a `CLIPModel`,
//! and the sizes of the shared transformer stack, [`ClipEncoderConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::json::{parse_json, read_json};
use crate::models::config::unknown_keys;
use crate::nn::Activation;
use crate::{Error, Result};

/// A parsed JSON object.
pub(super) type JsonMap = serde_json::Map<String, serde_json::Value>;

/// `[("field", $value.field), ...]`: the listed fields of `$value` under their own names, the
/// config keys they are read from.
macro_rules! named {
    ($value:ident: $($field:ident),*) => {
        [$((stringify!($field), $value.$field)),*]
    };
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

impl ClipEncoderConfig {
    /// Checks the sizes under transformers' key names: positive, heads dividing the width, a
    /// positive epsilon; errors name `source`.
    pub fn validate(&self, source: &Path) -> Result<()> {
        check_positive(
            source,
            &named!(self: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads),
        )?;
        check_divides(
            source,
            ("num_attention_heads", self.num_attention_heads),
            ("hidden_size", self.hidden_size),
        )?;
        check_positive_real(source, "layer_norm_eps", self.layer_norm_eps)
    }
}

/// The transformers class a checkpoint was saved as; it decides whether there is a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipTextArchitecture {
    /// `CLIPTextModel`: no projection (SD 1.x and 2.x, SDXL's first encoder).
    TextModel,
    /// `CLIPTextModelWithProjection`: adds `text_projection.weight` `[projection_dim, hidden_size]`,
    /// no bias (SDXL's second encoder).
    TextModelWithProjection,
    /// The text half of a `CLIPModel` (CLIP-score style reward models): `text_projection.weight`
    /// with the model's top-level `projection_dim`.
    ClipModel,
}

impl ClipTextArchitecture {
    /// Whether this class has a `text_projection`.
    pub fn has_projection(self) -> bool {
        !matches!(self, ClipTextArchitecture::TextModel)
    }

    fn from_class_name(name: &str) -> Option<Self> {
        Some(match name {
            "CLIPTextModel" => ClipTextArchitecture::TextModel,
            "CLIPTextModelWithProjection" => ClipTextArchitecture::TextModelWithProjection,
            "CLIPModel" => ClipTextArchitecture::ClipModel,
            _ => return None,
        })
    }
}

/// How the pooled (end-of-text) position is found in each row of `input_ids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipPooling {
    /// Configs from before transformers PR #24773 say `eos_token_id: 2`: the position of the
    /// largest id (the end-of-text token has the largest id of CLIP's vocabulary), first on ties.
    ArgmaxId,
    /// The first position holding this id (padding may repeat it); position 0 when the row has
    /// none, as transformers does.
    FirstEos(i64),
}

/// Keys of a transformers CLIP `config.json` that are read but do not change the forward pass
/// (no warning for them). The text config reads `architectures` before these are dropped.
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

/// A transformers `CLIPTextConfig` (`config.json` of `CLIPTextModel` /
/// `CLIPTextModelWithProjection`, or `text_config` of a `CLIPModel`). Fields are the JSON keys;
/// absent keys take transformers 5's defaults, noted per field.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// `architectures[0]`: the class, hence whether there is a projection (default
    /// `CLIPTextModel`; [`ClipTextConfig::from_clip_model_file`] sets `CLIPModel`).
    pub architecture: ClipTextArchitecture,
    /// Vocabulary size (default 49408).
    pub vocab_size: usize,
    /// Width D of the hidden states (default 512).
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer (default 2048).
    pub intermediate_size: usize,
    /// Output width of `text_projection` (default 512; for a `CLIPModel`, the top-level value).
    pub projection_dim: usize,
    /// Number of encoder layers (default 12).
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size` (default 8).
    pub num_attention_heads: usize,
    /// Longest sequence, the rows of `position_embedding` (default 77).
    pub max_position_embeddings: usize,
    /// MLP activation (default `quick_gelu`; SD 2.x and SDXL's second encoder use `gelu`).
    pub hidden_act: Activation,
    /// Layer-norm epsilon (default 1e-5).
    pub layer_norm_eps: f64,
    /// Padding id (default 1; unused by the model).
    pub pad_token_id: Option<i64>,
    /// Start-of-text id (default 49406; unused by the model).
    pub bos_token_id: Option<i64>,
    /// End-of-text id; 2 selects the legacy pooling rule, see [`ClipPooling`] (default 49407).
    pub eos_token_id: i64,
    /// Keys this crate does not read, verbatim.
    pub other: BTreeMap<String, serde_json::Value>,
    /// Where the config came from, for error messages.
    pub source: PathBuf,
}

const TEXT_CONFIG: &str = "CLIP text encoder config";
const MODEL_CONFIG: &str = "CLIP model config";

impl ClipTextConfig {
    /// Reads the `config.json` of a `CLIPTextModel` or `CLIPTextModelWithProjection`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_map(read_json(path, TEXT_CONFIG)?, path.to_path_buf(), "")
    }

    /// Parses the text of a text encoder `config.json`; `source` names it in errors.
    pub fn from_json(text: &str, source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        Self::from_map(parse_json(text, &source, TEXT_CONFIG)?, source, "")
    }

    /// Reads the text encoder of a full `CLIPModel` `config.json`: its `text_config` (updated by
    /// a legacy `text_config_dict`, as transformers does), with the top-level `projection_dim`
    /// (default 512) as the projection width.
    pub fn from_clip_model_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_clip_model_map(read_json(path, MODEL_CONFIG)?, path.to_path_buf())
    }

    /// Parses the text of a `CLIPModel` `config.json`; `source` names it in errors.
    pub fn from_clip_model_json(text: &str, source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        Self::from_clip_model_map(parse_json(text, &source, MODEL_CONFIG)?, source)
    }

    fn from_clip_model_map(mut top: JsonMap, source: PathBuf) -> Result<Self> {
        let mut text_config = tower_config(&mut top, "text_config", &source)?;
        let projection_dim = take(&mut top, "projection_dim", "", &source)?.unwrap_or(512);
        // The class is the whole model's; the text part's own `architectures` does not apply.
        text_config.remove("architectures");
        let mut cfg = Self::from_map(text_config, source, "text_config.")?;
        cfg.architecture = ClipTextArchitecture::ClipModel;
        cfg.projection_dim = projection_dim;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `architectures` (the class) from `map`; a bad value names its key after `key_prefix`.
    fn read_architecture(&mut self, map: &mut JsonMap, key_prefix: &str) -> Result<()> {
        let err = |reason: String| Error::config(&self.source, format!("{key_prefix}architectures"), reason);
        if let Some(names) = take::<Vec<String>>(map, "architectures", key_prefix, &self.source)? {
            let name = names.first().ok_or_else(|| err("empty list".into()))?;
            if name == "CLIPModel" {
                return Err(err("a full CLIPModel config; read its text encoder with \
                     ClipTextConfig::from_clip_model_file"
                    .into()));
            }
            self.architecture = ClipTextArchitecture::from_class_name(name).ok_or_else(|| {
                err(format!(
                    "unsupported class {name:?}; expected CLIPTextModel or CLIPTextModelWithProjection"
                ))
            })?;
        }
        Ok(())
    }

    /// Checks what transformers' `validate_architecture` and the layer shapes need.
    pub fn validate(&self) -> Result<()> {
        let source = &self.source;
        check_positive(source, &named!(self: vocab_size, max_position_embeddings))?;
        if self.architecture.has_projection() {
            check_positive(source, &named!(self: projection_dim))?;
        }
        self.encoder().validate(source)
    }

    /// The pooling rule `eos_token_id` selects.
    pub fn pooling(&self) -> ClipPooling {
        if self.eos_token_id == 2 {
            ClipPooling::ArgmaxId
        } else {
            ClipPooling::FirstEos(self.eos_token_id)
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

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

impl ClipVisionConfig {
    /// Reads a `config.json`: a `CLIPModel`'s (its `vision_config`, updated by a legacy
    /// `vision_config_dict`, with the top-level `projection_dim`) or a
    /// `CLIPVisionModelWithProjection`'s (the keys at the top level).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_object(read_json(path, MODEL_CONFIG)?, path)
    }

    /// [`ClipVisionConfig::from_file`] on parsed JSON; `source` names it in errors.
    pub fn from_object(mut top: JsonMap, source: &Path) -> Result<Self> {
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
        let mut vision = tower_config(&mut top, "vision_config", source)?;
        vision.remove("projection_dim");
        if let Some(v) = top.remove("projection_dim") {
            vision.insert("projection_dim".into(), v);
        }
        Self::from_map(vision, source.to_path_buf(), "vision_config.")
    }

    /// Checks what the layer shapes need: positive sizes, heads dividing the width, patches
    /// tiling the image, a positive epsilon.
    pub fn validate(&self) -> Result<()> {
        let source = &self.source;
        check_positive(
            source,
            &named!(self: projection_dim, num_channels, image_size, patch_size),
        )?;
        self.encoder().validate(source)?;
        check_divides(source, ("patch_size", self.patch_size), ("image_size", self.image_size))
    }

    /// Number of patches along one side, `image_size / patch_size`.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// What both tower configs share: they hold the encoder's sizes under the same keys and the
/// unread keys in `other`. `$config { key: default, ... }` lists the keys read from JSON (the
/// key is the field's name) with transformers' default; `else { ... }` the defaults of fields
/// that `$read_more` reads after them, in its own way.
macro_rules! tower_config {
    (
        $config:ident { $($field:ident: $default:expr),* $(,)? }
        $(else { $($other_field:ident: $other_default:expr),* $(,)? } then $read_more:ident)?
    ) => {
        impl Default for $config {
            fn default() -> Self {
                $config {
                    $($field: $default,)*
                    $($($other_field: $other_default,)*)?
                    other: BTreeMap::new(),
                    source: PathBuf::from("config.json"),
                }
            }
        }

        impl $config {
            /// Reads the known keys of `map` one by one, so that a bad value names its key (after
            /// `prefix`), keeps the rest in `other`, then validates.
            fn from_map(mut map: JsonMap, source: PathBuf, prefix: &str) -> Result<Self> {
                let mut cfg = Self {
                    source,
                    ..Self::default()
                };
                $(
                    if let Some(v) = take(&mut map, stringify!($field), prefix, &cfg.source)? {
                        cfg.$field = v;
                    }
                )*
                $(cfg.$read_more(&mut map, prefix)?;)?
                cfg.other = leftover(map);
                cfg.validate()?;
                Ok(cfg)
            }

            /// Keys of the file that diffalign does not read (`_`-prefixed bookkeeping excluded),
            /// sorted, for a warning at load time.
            pub fn unknown_keys(&self) -> Vec<String> {
                unknown_keys(&self.other)
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

            /// The config with the encoder stack's sizes of `encoder`.
            pub fn with_encoder(mut self, encoder: ClipEncoderConfig) -> Self {
                self.hidden_size = encoder.hidden_size;
                self.intermediate_size = encoder.intermediate_size;
                self.num_hidden_layers = encoder.num_hidden_layers;
                self.num_attention_heads = encoder.num_attention_heads;
                self.hidden_act = encoder.hidden_act;
                self.layer_norm_eps = encoder.layer_norm_eps;
                self
            }
        }
    };
}

// transformers 5's `CLIPTextConfig()` defaults, as a `CLIPTextModel`.
tower_config! {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 512,
        intermediate_size: 2048,
        projection_dim: 512,
        num_hidden_layers: 12,
        num_attention_heads: 8,
        max_position_embeddings: 77,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
        pad_token_id: Some(1),
        bos_token_id: Some(49406),
        eos_token_id: 49407,
    }
    else { architecture: ClipTextArchitecture::TextModel } then read_architecture
}

// transformers 5's `CLIPVisionConfig()` defaults.
tower_config! {
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
    }
}

/// Removes `key` from `map` and deserialises it; a bad value is a config error on
/// `{prefix}{key}` in `source`.
pub(super) fn take<T: DeserializeOwned>(
    map: &mut JsonMap,
    key: &str,
    prefix: &str,
    source: &Path,
) -> Result<Option<T>> {
    map.remove(key)
        .map(|v| serde_json::from_value(v).map_err(|e| Error::config(source, format!("{prefix}{key}"), e.to_string())))
        .transpose()
}

/// Removes the object `key` from `top` (absent or null: empty), merged with transformers'
/// legacy `{key}_dict`, which overrides it.
fn tower_config(top: &mut JsonMap, key: &str, source: &Path) -> Result<JsonMap> {
    let mut sub = |key: &str| match top.remove(key) {
        None | Some(serde_json::Value::Null) => Ok(JsonMap::new()),
        Some(v) => json_object(v, key, source),
    };
    let mut config = sub(key)?;
    config.extend(sub(&format!("{key}_dict"))?);
    Ok(config)
}

/// `value` as an object; anything else is a config error on `key`.
pub(super) fn json_object(value: serde_json::Value, key: &str, source: &Path) -> Result<JsonMap> {
    match value {
        serde_json::Value::Object(m) => Ok(m),
        other => Err(Error::config(
            source,
            key,
            format!("expected a JSON object, got {other}"),
        )),
    }
}

/// The keys left after reading, minus [`IGNORED_KEYS`], for a config's `other`.
fn leftover(mut map: JsonMap) -> BTreeMap<String, serde_json::Value> {
    for key in IGNORED_KEYS {
        map.remove(*key);
    }
    map.into_iter().collect()
}

/// Fails on the first `(key, value)` that is 0.
pub(crate) fn check_positive(source: &Path, sizes: &[(&str, usize)]) -> Result<()> {
    match sizes.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(Error::config(source, *key, "must be > 0, got 0")),
        None => Ok(()),
    }
}

/// Fails unless `part` (positive) divides `whole`, naming both keys.
pub(crate) fn check_divides(source: &Path, part: (&str, usize), whole: (&str, usize)) -> Result<()> {
    if whole.1 % part.1 == 0 {
        return Ok(());
    }
    Err(Error::config(
        source,
        part.0,
        format!("must divide {} ({}), got {}", whole.0, whole.1, part.1),
    ))
}

/// Fails unless `value` is finite and > 0.
pub(super) fn check_positive_real(source: &Path, key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    Err(Error::config(source, key, format!("must be > 0, got {value}")))
}

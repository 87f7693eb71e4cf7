//! The CLIP text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
//! Language Supervision", arXiv 2103.00020), as transformers'
//! `src/transformers/models/clip/modeling_clip.py` (`CLIPTextModel`, `CLIPTextModelWithProjection`
//! and the text half of `CLIPModel`), with exact numerics and a backward pass through every
//! weight (our own [`LayerNorm`], softmax and activations, see `crate::nn`).
//!
//! Input: token ids `[B, L]` (u32 or i64, `L <= max_position_embeddings`). Output
//! ([`ClipTextOutput`]): the final-layer-normed `last_hidden_state` `[B, L, D]`, the
//! `penultimate_hidden_state` `[B, L, D]` (`hidden_states[-2]`, no final layer norm: what SDXL
//! conditions on), optionally every hidden state, the `pooler_output` `[B, D]` (the final state at
//! the end-of-text token) and, with a projection, `text_embeds` `[B, projection_dim]`.
//!
//! Attention is causal with no padding mask, as diffusers calls the encoder. There is no dropout:
//! `attention_dropout` is read and ignored (it is 0 in every released checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::nn::{scaled_dot_product_attention, Activation, LayerNorm, Linear};
use crate::weights::VarBuilder;
use crate::{Error, Result};

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

/// Keys of a transformers CLIP text `config.json` that are read but do not change the forward
/// pass (no warning for them).
const IGNORED_KEYS: &[&str] = &[
    "attention_dropout",
    "dropout",
    "initializer_range",
    "initializer_factor",
    "dtype",
    "torch_dtype",
    "model_type",
    "transformers_version",
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

impl Default for ClipTextConfig {
    /// transformers 5's `CLIPTextConfig()` defaults, as a `CLIPTextModel`.
    fn default() -> Self {
        ClipTextConfig {
            architecture: ClipTextArchitecture::TextModel,
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
            other: BTreeMap::new(),
            source: PathBuf::from("config.json"),
        }
    }
}

impl ClipTextConfig {
    /// Reads the `config.json` of a `CLIPTextModel` or `CLIPTextModelWithProjection`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&read_text(path, "CLIP text encoder config")?, path)
    }

    /// Parses the text of a text encoder `config.json`; `source` names it in errors.
    pub fn from_json(text: &str, source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        let map = parse_object(text, &source)?;
        Self::from_map(map, source, "")
    }

    /// Reads the text encoder of a full `CLIPModel` `config.json`: its `text_config` (updated by
    /// a legacy `text_config_dict`, as transformers does), with the top-level `projection_dim`
    /// (default 512) as the projection width.
    pub fn from_clip_model_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_clip_model_json(&read_text(path, "CLIP model config")?, path)
    }

    /// Parses the text of a `CLIPModel` `config.json`; `source` names it in errors.
    pub fn from_clip_model_json(text: &str, source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        let mut top = parse_object(text, &source)?;
        let sub = |top: &mut serde_json::Map<String, serde_json::Value>, key: &str| match top.remove(key) {
            None | Some(serde_json::Value::Null) => Ok(serde_json::Map::new()),
            Some(serde_json::Value::Object(m)) => Ok(m),
            Some(v) => Err(Error::config(&source, key, format!("expected a JSON object, got {v}"))),
        };
        let mut text_config = sub(&mut top, "text_config")?;
        text_config.extend(sub(&mut top, "text_config_dict")?);
        let projection_dim = match top.remove("projection_dim") {
            Some(v) => {
                serde_json::from_value(v).map_err(|e| Error::config(&source, "projection_dim", e.to_string()))?
            }
            None => 512,
        };
        // The class is the whole model's; the text part's own `architectures` does not apply.
        text_config.remove("architectures");
        let mut cfg = Self::from_map(text_config, source, "text_config.")?;
        cfg.architecture = ClipTextArchitecture::ClipModel;
        cfg.projection_dim = projection_dim;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the known keys of `map` one by one, so that a bad value names its key (prefixed by
    /// `key_prefix`), then validates.
    fn from_map(
        mut map: serde_json::Map<String, serde_json::Value>,
        source: PathBuf,
        key_prefix: &str,
    ) -> Result<Self> {
        let mut cfg = ClipTextConfig {
            source,
            ..ClipTextConfig::default()
        };
        let err = |cfg: &ClipTextConfig, key: &str, reason: String| {
            Error::config(&cfg.source, format!("{key_prefix}{key}"), reason)
        };
        macro_rules! read {
            ($($field:ident),* $(,)?) => {$(
                if let Some(v) = map.remove(stringify!($field)) {
                    cfg.$field = serde_json::from_value(v).map_err(|e| err(&cfg, stringify!($field), e.to_string()))?;
                }
            )*};
        }
        read!(
            vocab_size,
            hidden_size,
            intermediate_size,
            projection_dim,
            num_hidden_layers,
            num_attention_heads,
            max_position_embeddings,
            hidden_act,
            layer_norm_eps,
            pad_token_id,
            bos_token_id,
            eos_token_id,
        );
        if let Some(v) = map.remove("architectures") {
            let names: Vec<String> =
                serde_json::from_value(v).map_err(|e| err(&cfg, "architectures", e.to_string()))?;
            let name = names
                .first()
                .ok_or_else(|| err(&cfg, "architectures", "empty list".into()))?;
            if name == "CLIPModel" {
                return Err(err(
                    &cfg,
                    "architectures",
                    "a full CLIPModel config; read its text encoder with \
                     ClipTextConfig::from_clip_model_file"
                        .into(),
                ));
            }
            cfg.architecture = ClipTextArchitecture::from_class_name(name).ok_or_else(|| {
                err(
                    &cfg,
                    "architectures",
                    format!("unsupported class {name:?}; expected CLIPTextModel or CLIPTextModelWithProjection"),
                )
            })?;
        }
        for key in IGNORED_KEYS {
            map.remove(*key);
        }
        cfg.other = map.into_iter().collect();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what transformers' `validate_architecture` and the layer shapes need.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(&self.source, key, "must be > 0, got 0"));
            }
        }
        if self.architecture.has_projection() && self.projection_dim == 0 {
            return Err(Error::config(&self.source, "projection_dim", "must be > 0, got 0"));
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
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::config(
                &self.source,
                "layer_norm_eps",
                format!("must be > 0, got {}", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    /// Keys of the file that diffalign does not read (`_`-prefixed bookkeeping excluded), sorted,
    /// for a warning at load time.
    pub fn unknown_keys(&self) -> Vec<String> {
        self.other.keys().filter(|k| !k.starts_with('_')).cloned().collect()
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

fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            what: what.into(),
        },
        _ => Error::io(path, e),
    })
}

fn parse_object(text: &str, source: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::config(source, "(file)", "expected a JSON object")),
        Err(e) => Err(Error::config(source, "(file)", format!("malformed JSON: {e}"))),
    }
}

/// Where a checkpoint keeps the text transformer's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipTextLayout {
    /// Under `text_model.`: `CLIPTextModel` saved by transformers 4 (the SD checkpoints on the
    /// Hub), `CLIPTextModelWithProjection` and `CLIPModel`.
    Prefixed,
    /// At the root (`embeddings.`, `encoder.`, `final_layer_norm.`): `CLIPTextModel` saved by
    /// transformers 5, which strips the prefix (its `PrefixChange(prefix_to_remove="text_model")`).
    Flat,
}

impl ClipTextLayout {
    /// Reads the layout off the checkpoint under `vb`: which of
    /// `text_model.embeddings.token_embedding.weight` and `embeddings.token_embedding.weight` it
    /// holds. Neither, or both, is an error naming the checkpoint. Random weights are `Prefixed`.
    pub fn detect(vb: &VarBuilder) -> Result<Self> {
        let Some(store) = vb.store() else {
            return Ok(ClipTextLayout::Prefixed);
        };
        const PROBE: &str = "embeddings.token_embedding.weight";
        let prefixed = vb.pp("text_model").path(PROBE);
        let flat = vb.path(PROBE);
        match (store.contains(&prefixed), store.contains(&flat)) {
            (true, false) => Ok(ClipTextLayout::Prefixed),
            (false, true) => Ok(ClipTextLayout::Flat),
            (false, false) => Err(Error::MissingTensor {
                file: store.label().to_path_buf(),
                name: format!("{prefixed} (or {flat}): not a CLIP text encoder checkpoint"),
            }),
            (true, true) => Err(Error::BadSafetensors {
                file: store.label().to_path_buf(),
                reason: format!("holds both {prefixed} and {flat}, so the CLIP text encoder's key layout is ambiguous"),
            }),
        }
    }
}

/// Whether `name` is a known non-parameter buffer of a CLIP text checkpoint, which the model
/// does not read: `position_ids` (`arange(max_position_embeddings)`, saved by transformers 4).
/// For [`crate::weights::TensorStore::check_all_used`].
pub fn is_known_buffer(name: &str) -> bool {
    matches!(name, "text_model.embeddings.position_ids" | "embeddings.position_ids")
}

/// Runtime choices for [`ClipTextModel::forward_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ClipTextForwardOptions {
    /// Also return every hidden state in [`ClipTextOutput::hidden_states`] (default false).
    pub output_hidden_states: bool,
}

/// What the text encoder computes for a batch of token ids `[B, L]`.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The last layer's output after `final_layer_norm`, `[B, L, D]` (SD 1.x/2.x conditioning).
    pub last_hidden_state: Tensor,
    /// The second-to-last layer's output, `hidden_states[-2]`, no final layer norm, `[B, L, D]`
    /// (SDXL conditioning). With one layer, the embeddings.
    pub penultimate_hidden_state: Tensor,
    /// With [`ClipTextForwardOptions::output_hidden_states`]: the embeddings then each layer's
    /// output (`num_hidden_layers + 1` tensors `[B, L, D]`, none final-layer-normed).
    pub hidden_states: Option<Vec<Tensor>>,
    /// `last_hidden_state` at each row's end-of-text position (see [`ClipPooling`]), `[B, D]`.
    pub pooler_output: Tensor,
    /// `pooler_output @ text_projection^T`, `[B, projection_dim]`, when the model has a projection.
    pub text_embeds: Option<Tensor>,
}

/// `text_model.embeddings`: token plus position embeddings.
#[derive(Debug, Clone)]
struct ClipTextEmbeddings {
    token_embedding: Tensor,
    position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let token_embedding = vb
            .pp("token_embedding")
            .get(&[cfg.vocab_size, cfg.hidden_size], "weight")?;
        let position_embedding = vb
            .pp("position_embedding")
            .get(&[cfg.max_position_embeddings, cfg.hidden_size], "weight")?;
        Ok(ClipTextEmbeddings {
            token_embedding,
            position_embedding,
        })
    }

    /// `ids`: flat `[B * L]` u32 on the model's device; gives `[B, L, D]`.
    fn forward(&self, ids: &Tensor, b: usize, l: usize) -> Result<Tensor> {
        let d = self.token_embedding.dim(1)?;
        let tokens = self.token_embedding.index_select(ids, 0)?.reshape((b, l, d))?;
        let positions = self.position_embedding.narrow(0, 0, l)?;
        Ok(tokens.broadcast_add(&positions)?)
    }
}

/// `self_attn`: multi-head attention with `q_proj`, `k_proj`, `v_proj`, `out_proj`.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::new(d, d, true, vb.pp("q_proj"))?,
            k_proj: Linear::new(d, d, true, vb.pp("k_proj"))?,
            v_proj: Linear::new(d, d, true, vb.pp("v_proj"))?,
            out_proj: Linear::new(d, d, true, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `xs` `[B, L, D]`, `mask` `[L, L]` additive.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let ys = scaled_dot_product_attention(&q, &k, &v, scale, Some(mask))?;
        let ys = ys.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_proj.forward(&ys)
    }
}

/// `mlp`: `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(ClipMlp {
            fc1: Linear::new(cfg.hidden_size, cfg.intermediate_size, true, vb.pp("fc1"))?,
            fc2: Linear::new(cfg.intermediate_size, cfg.hidden_size, true, vb.pp("fc2"))?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(xs)?)?)
    }
}

/// `encoder.layers.N`: pre-norm attention and MLP blocks with residuals.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(ClipEncoderLayer {
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(cfg, vb.pp("mlp"))?,
            layer_norm2: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        Ok((&xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?)?)
    }
}

/// `encoder`: the stack of layers.
#[derive(Debug, Clone)]
struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

/// transformers' `CLIPTextModel` body: `embeddings`, `encoder`, `final_layer_norm`.
#[derive(Debug, Clone)]
struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
}

impl ClipTextTransformer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = ClipTextEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, layers_vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(ClipTextTransformer {
            embeddings,
            encoder: ClipEncoder { layers },
            final_layer_norm,
        })
    }
}

/// A CLIP text encoder with transformers' outputs, optionally with `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    text_model: ClipTextTransformer,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
    device: Device,
}

impl ClipTextModel {
    /// Builds the model from `vb` at the checkpoint root: the transformer where `layout` says,
    /// plus `text_projection.weight` `[projection_dim, hidden_size]` when `cfg.architecture` has
    /// a projection. Does not audit unused tensors (see [`ClipTextModel::load`]).
    pub fn new(cfg: &ClipTextConfig, layout: ClipTextLayout, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let body_vb = match layout {
            ClipTextLayout::Prefixed => vb.pp("text_model"),
            ClipTextLayout::Flat => vb.clone(),
        };
        let text_model = ClipTextTransformer::new(cfg, body_vb)?;
        let text_projection = if cfg.architecture.has_projection() {
            Some(Linear::new(
                cfg.hidden_size,
                cfg.projection_dim,
                false,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(ClipTextModel {
            text_model,
            text_projection,
            config: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// Builds the model from a checkpoint that holds this text encoder only (a `text_encoder/`
    /// folder's weights): detects the [`ClipTextLayout`], calls [`ClipTextModel::new`], then fails
    /// if a tensor of the checkpoint went unused, except the buffers of [`is_known_buffer`].
    pub fn load(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let model = Self::new(cfg, ClipTextLayout::detect(&vb)?, vb.clone())?;
        if let Some(store) = vb.store() {
            store.check_all_used(is_known_buffer)?;
        }
        Ok(model)
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Runs the encoder on `input_ids` `[B, L]` (u32 or i64, on any device).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_with(input_ids, &ClipTextForwardOptions::default())
    }

    /// [`ClipTextModel::forward`] with options.
    pub fn forward_with(&self, input_ids: &Tensor, opts: &ClipTextForwardOptions) -> Result<ClipTextOutput> {
        let ids = self.read_ids(input_ids)?;
        let (b, l) = (ids.len(), ids[0].len());
        let flat: Vec<u32> = ids.iter().flatten().map(|&id| id as u32).collect();
        let flat = Tensor::from_vec(flat, b * l, &self.device)?;
        let mask = causal_mask(l, &self.device)?;

        let n = self.text_model.encoder.layers.len();
        let mut xs = self.text_model.embeddings.forward(&flat, b, l)?;
        let mut all = opts.output_hidden_states.then(|| Vec::with_capacity(n + 1));
        let mut penultimate = None;
        for (i, layer) in self.text_model.encoder.layers.iter().enumerate() {
            if let Some(all) = all.as_mut() {
                all.push(xs.clone());
            }
            if i + 1 == n {
                penultimate = Some(xs.clone());
            }
            xs = layer.forward(&xs, &mask)?;
        }
        if let Some(all) = all.as_mut() {
            all.push(xs.clone());
        }
        let penultimate_hidden_state = penultimate.expect("validated: num_hidden_layers >= 1");
        let last_hidden_state = self.text_model.final_layer_norm.forward(&xs)?;

        let rows: Vec<u32> = pooled_positions(&ids, self.config.pooling())
            .into_iter()
            .enumerate()
            .map(|(row, pos)| (row * l + pos) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, &self.device)?;
        let d = self.config.hidden_size;
        let pooler_output = last_hidden_state.reshape((b * l, d))?.index_select(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooler_output)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            penultimate_hidden_state,
            hidden_states: all,
            pooler_output,
            text_embeds,
        })
    }

    /// Checks `input_ids` (rank 2, integer, ids inside the vocabulary, length within the position
    /// table) and reads them to the host.
    fn read_ids(&self, input_ids: &Tensor) -> Result<Vec<Vec<i64>>> {
        let bad = |reason: String| Error::input("input_ids", reason);
        let (b, l) = input_ids
            .dims2()
            .map_err(|_| bad(format!("expected shape [B, L], got {:?}", input_ids.dims())))?;
        if b == 0 || l == 0 {
            return Err(bad(format!("expected a non-empty batch, got shape [{b}, {l}]")));
        }
        if l > self.config.max_position_embeddings {
            return Err(bad(format!(
                "sequence length must be <= max_position_embeddings ({}), got {l}",
                self.config.max_position_embeddings
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
        let vocab = self.config.vocab_size as i64;
        for (r, row) in ids.iter().enumerate() {
            if let Some((c, &id)) = row.iter().enumerate().find(|(_, &id)| id < 0 || id >= vocab) {
                return Err(bad(format!(
                    "id at [{r}, {c}] must be in 0..{vocab} (vocab_size), got {id}"
                )));
            }
        }
        Ok(ids)
    }
}

/// The pooled position of each row of `ids` under `rule` (transformers' `pooled_output` index).
pub fn pooled_positions(ids: &[Vec<i64>], rule: ClipPooling) -> Vec<usize> {
    ids.iter()
        .map(|row| match rule {
            // First maximum, as torch.argmax.
            ClipPooling::ArgmaxId => {
                row.iter()
                    .enumerate()
                    .fold((0, i64::MIN), |best, (i, &id)| if id > best.1 { (i, id) } else { best })
                    .0
            }
            ClipPooling::FirstEos(eos) => row.iter().position(|&id| id == eos).unwrap_or(0),
        })
        .collect()
}

/// The additive causal mask `[L, L]` (f32): 0 on and below the diagonal, -inf above.
fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (l, l), device)?)
}

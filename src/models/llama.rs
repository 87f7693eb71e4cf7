//! Llama-family causal language models (Llama, Mistral, Qwen2), as transformers'
//! `models/llama/modeling_llama.py` (and the Mistral / Qwen2 files, which differ only in their
//! config defaults: Qwen2's q/k/v biases, Mistral's sliding window): token embeddings, decoder
//! layers of RMSNorm → grouped-query attention with rotary position embeddings → residual,
//! RMSNorm → SwiGLU MLP → residual, a final RMSNorm, and the LM head ([`LlamaForCausalLM`]);
//! `crate::lm::reward_model` puts reward heads (transformers' `*ForSequenceClassification`
//! `score`, or a GPM head) on the same [`LlamaModel`].
//!
//! Every op has a backward pass (our RMSNorm, and attention with its additive mask through
//! `crate::nn::scaled_dot_product_attention`, the fused kernel), so every parameter receives a
//! gradient; candle-transformers' versions cut gradients at their fused norms.
//! Positions are `0..T` for every row, as transformers' plain forward does; the attention mask
//! blocks padded keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::models::config::read_config;
use crate::nn::{scaled_dot_product_attention, Activation, Linear, RmsNorm};
use crate::weights::VarBuilder;
use crate::{Error, Result};

/// RoPE settings: transformers 5's `rope_parameters`, or older checkpoints' top-level keys.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct RopeParameters {
    /// Base of the frequencies.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `default`, `linear` or `llama3` (alias `type`).
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// Scaling factor of `linear` and `llama3`.
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3`: low-frequency factor.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: high-frequency factor.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length the model was pretrained with.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// A transformers `LlamaConfig` / `MistralConfig` / `Qwen2Config` (`config.json`); absent keys
/// take that architecture's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// `architectures[0]` (`LlamaForCausalLM`, `Qwen2ForSequenceClassification`, ...).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention; default: the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of a head (default `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// transformers 5's RoPE settings.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Older checkpoints' RoPE base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Older checkpoints' RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// Biases on q/k/v/o (Llama's `attention_bias`; Qwen2 always has q/k/v biases).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Biases on the MLP's projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The MLP's activation (only `silu` is used by these families).
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The longest sequence the model was made for, in tokens (absent: transformers' default
    /// for the family, see [`LlamaConfig::max_positions`]).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Mistral's sliding attention window (`null`: full attention).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2 applies `sliding_window` only when this is set.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Padding id (the sequence classifier reads the last token that is not padding).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence id(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Outputs of the sequence-classification head.
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Labels of the sequence-classification head (their count is `num_labels`).
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Every other key, unread.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
    /// Where the config came from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// Keys every causal-LM config gives (no transformers default stands in for them).
const REQUIRED_KEYS: [&str; 5] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
];

/// Fails, naming `path` and the key, when `json` is not a causal-LM config: a diffusers config
/// (it has `_class_name`), or one without a decoder size (a null or absent required key).
fn check_causal_lm(json: &serde_json::Value, path: &Path) -> Result<()> {
    let not_lm = "not a causal-LM config (llama, mistral or qwen2)";
    if let Some(class) = json.get("_class_name") {
        return Err(Error::config(
            path,
            "_class_name",
            format!("{not_lm}: a diffusers {class} config"),
        ));
    }
    if !json.is_object() {
        return Err(Error::config(path, "(file)", format!("{not_lm}: not a JSON object")));
    }
    for key in REQUIRED_KEYS {
        if json.get(key).is_none_or(|v| v.is_null()) {
            return Err(Error::config(path, key, format!("{not_lm}: missing or null")));
        }
    }
    Ok(())
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_act() -> Activation {
    Activation::Silu
}

impl LlamaConfig {
    /// Reads `config.json`; errors name the file and key. A config of another kind of model (a
    /// diffusers UNet's, a config missing the decoder's sizes) says so, naming the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json: serde_json::Value = read_config(path)?;
        check_causal_lm(&json, path)?;
        let mut cfg: LlamaConfig = crate::json::parse_json(&json.to_string(), path, "causal-LM config")?;
        cfg.source = path.to_path_buf();
        cfg.validate()?;
        Ok(cfg)
    }

    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.source, key, msg.into())
    }

    fn validate(&self) -> Result<()> {
        if !matches!(self.model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(self.err(
                "model_type",
                format!("expected llama, mistral or qwen2, got {:?}", self.model_type),
            ));
        }
        if self.hidden_act != Activation::Silu {
            return Err(self.err("hidden_act", "only silu (SwiGLU) is supported"));
        }
        let heads = self.num_attention_heads;
        if heads == 0 || self.num_hidden_layers == 0 || self.hidden_size == 0 {
            return Err(self.err("num_attention_heads", "heads, layers and width must be positive"));
        }
        if self.head_dim.is_none() && self.hidden_size % heads != 0 {
            return Err(self.err(
                "num_attention_heads",
                format!("{heads} heads do not divide hidden_size {}", self.hidden_size),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || heads % kv != 0 {
            return Err(self.err(
                "num_key_value_heads",
                format!("{kv} key/value heads do not divide {heads} query heads"),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(self.err("head_dim", format!("must be even for RoPE, got {}", self.head_dim())));
        }
        self.rope()?;
        Ok(())
    }

    /// The longest sequence the model takes: `max_position_embeddings`, or transformers' default
    /// for the family when the key is absent (Llama 2048, Mistral 131072, Qwen2 32768).
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.unwrap_or(match self.model_type.as_str() {
            "mistral" => 131_072,
            "qwen2" => 32_768,
            _ => 2048,
        })
    }

    /// Parameters of the model, counted from the config without building it: the embeddings
    /// (twice unless tied), each layer's attention and MLP projections (biases and norms left
    /// out), to refuse a config too large for the machine before allocating it.
    pub fn parameter_count(&self) -> f64 {
        let h = self.hidden_size as f64;
        let q = (self.num_attention_heads * self.head_dim()) as f64;
        let kv = (self.kv_heads() * self.head_dim()) as f64;
        let mlp = 3.0 * h * self.intermediate_size as f64;
        let layer = h * (2.0 * q + 2.0 * kv) + mlp;
        let embeddings = self.vocab_size as f64 * h * if self.tie_word_embeddings { 1.0 } else { 2.0 };
        embeddings + self.num_hidden_layers as f64 * layer
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v (and o) projections have biases: Qwen2 has them on q/k/v, Llama per
    /// `attention_bias`.
    fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias.unwrap_or(false)
    }

    /// The effective sliding window (Mistral always, Qwen2 with `use_sliding_window`).
    fn window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        }
    }

    /// The RoPE settings from `rope_parameters`, else the top-level `rope_theta` / `rope_scaling`.
    pub fn rope(&self) -> Result<RopeParameters> {
        let mut p = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        if p.rope_theta.is_none() {
            p.rope_theta = self.rope_theta.or(Some(10000.0));
        }
        match p.rope_type.as_deref().unwrap_or("default") {
            "default" => {}
            "linear" | "llama3" if p.factor.is_some_and(|f| f > 0.0) => {}
            "linear" | "llama3" => return Err(self.err("rope_parameters.factor", "must be a positive number")),
            other => {
                return Err(self.err(
                    "rope_parameters.rope_type",
                    format!("{other:?} is not supported (default, linear and llama3 are)"),
                ))
            }
        }
        Ok(p)
    }

    /// Outputs of the sequence-classification head: `num_labels`, else the size of `id2label`, else 1.
    pub fn num_labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(1)
    }

    /// The end-of-sequence id (the first one when the config lists several).
    pub fn eos_id(&self) -> Option<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as u32),
            _ => None,
        }
    }
}

/// The inverse frequencies of RoPE, `[head_dim / 2]`, with `linear` / `llama3` scaling applied.
fn inv_freq(cfg: &LlamaConfig) -> Result<Vec<f64>> {
    let p = cfg.rope()?;
    let theta = p.rope_theta.unwrap_or(10000.0);
    let d = cfg.head_dim();
    let mut f: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    match p.rope_type.as_deref().unwrap_or("default") {
        "linear" => f.iter_mut().for_each(|x| *x /= p.factor.unwrap_or(1.0)),
        "llama3" => {
            let factor = p.factor.unwrap_or(8.0);
            let low = p.low_freq_factor.unwrap_or(1.0);
            let high = p.high_freq_factor.unwrap_or(4.0);
            let old = p.original_max_position_embeddings.unwrap_or(8192) as f64;
            let (low_wl, high_wl) = (old / low, old / high);
            for x in f.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *x;
                if wavelen > low_wl {
                    *x /= factor;
                } else if wavelen >= high_wl {
                    let smooth = (old / wavelen - low) / (high - low);
                    *x = (1.0 - smooth) * *x / factor + smooth * *x;
                }
            }
        }
        _ => {}
    }
    Ok(f)
}

/// `cos` and `sin` tables `[T, head_dim]` (the half-width table repeated, transformers' layout).
fn rope_tables(cfg: &LlamaConfig, len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let f = inv_freq(cfg)?;
    let half = f.len();
    let mut cos = Vec::with_capacity(len * 2 * half);
    let mut sin = Vec::with_capacity(len * 2 * half);
    for t in 0..len {
        for _ in 0..2 {
            for &w in &f {
                // Angles in f32 as transformers computes them, then cos/sin.
                let a = (t as f32 * w as f32) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    let cos = Tensor::from_vec(cos, (len, 2 * half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, 2 * half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// `x * cos + rotate_half(x) * sin` for `x` `[B, H, T, D]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

#[derive(Debug, Clone)]
struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl LlamaAttention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let bias = cfg.qkv_bias();
        Ok(LlamaAttention {
            q_proj: Linear::new(cfg.hidden_size, h * d, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(cfg.hidden_size, kv * d, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(cfg.hidden_size, kv * d, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(h * d, cfg.hidden_size, cfg.o_bias(), vb.pp("o_proj"))?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = apply_rope(&split(self.q_proj.forward(xs)?, self.heads)?, cos, sin)?;
        let k = apply_rope(&split(self.k_proj.forward(xs)?, self.kv_heads)?, cos, sin)?;
        let v = split(self.v_proj.forward(xs)?, self.kv_heads)?;
        // Grouped-query attention: each key/value head serves `heads / kv_heads` query heads.
        let group = self.heads / self.kv_heads;
        let (k, v) = if group > 1 {
            let rep = |x: &Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?
                    .broadcast_as((b, self.kv_heads, group, t, self.head_dim))?
                    .reshape((b, self.heads, t, self.head_dim))?)
            };
            (rep(&k)?, rep(&v)?)
        } else {
            (k, v)
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = scaled_dot_product_attention(&q, &k, &v, scale, Some(mask))?;
        let out = out.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_proj: Linear::new(h, i, bias, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, bias, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, bias, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: LlamaAttention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (xs
            + self
                .self_attn
                .forward(&self.input_layernorm.forward(xs)?, cos, sin, mask)?)?;
        Ok((&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

/// The decoder stack (`model.*` in the checkpoints): embeddings to final-normed hidden states.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    cfg: LlamaConfig,
}

/// Added to blocked attention scores: large enough to zero their weight, finite so that a row
/// with every key blocked (a left-padding position) stays finite.
const BLOCKED: f32 = -1e9;

impl LlamaModel {
    /// Builds the stack from `vb` at the checkpoint's `model` prefix.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let embed_tokens = vb
            .pp("embed_tokens")
            .get(&[cfg.vocab_size, cfg.hidden_size], "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        Ok(LlamaModel {
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            cfg: cfg.clone(),
        })
    }

    /// The token embedding matrix `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The additive mask `[B, 1, T, T]`: causal, the sliding window, and padded keys blocked.
    fn mask(&self, attention_mask: Option<&Tensor>, b: usize, t: usize, device: &Device) -> Result<Tensor> {
        let window = self.cfg.window();
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    let outside = window.is_some_and(|w| i >= j + w);
                    if j > i || outside {
                        BLOCKED
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, t), device)?;
        Ok(match attention_mask {
            Some(m) => {
                let keys = m.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?;
                let pad = ((1.0 - keys)? * (-(BLOCKED as f64)))?.neg()?;
                causal.broadcast_add(&pad)?
            }
            None => causal,
        })
    }

    /// Final-normed hidden states `[B, T, hidden]` for `input_ids` `[B, T]` (u32 or i64) and the
    /// optional `attention_mask` `[B, T]` (1 keep, 0 padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids.to_vec1::<u32>()?.into_iter().find(|&i| i >= vocab) {
            return Err(Error::input(
                "input_ids",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let device = self.embed_tokens.device();
        let mut xs = self
            .embed_tokens
            .index_select(&ids.to_device(device)?, 0)?
            .reshape((b, t, ()))?;
        let compute = crate::ops::compute_dtype(xs.dtype());
        let (cos, sin) = rope_tables(&self.cfg, t, xs.dtype(), device)?;
        let mask = self.mask(
            attention_mask.map(|m| m.to_device(device)).transpose()?.as_ref(),
            b,
            t,
            device,
        )?;
        let mask = mask.to_dtype(compute)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &cos, &sin, &mask)?;
        }
        self.norm.forward(&xs)
    }
}

/// Loads a model folder's config and weights (`model.safetensors` or its sharded index).
fn open(dir: &Path, opts: &crate::weights::LoadOptions) -> Result<(LlamaConfig, VarBuilder)> {
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let vb = opts.open(dir, "model")?;
    Ok((cfg, vb))
}

/// A causal LM: [`LlamaModel`] and the LM head (`lm_head.weight`, or the embeddings when tied).
#[derive(Debug, Clone)]
pub struct LlamaForCausalLM {
    model: LlamaModel,
    lm_head: Option<Linear>,
}

impl LlamaForCausalLM {
    /// Builds the model from `vb` (checkpoint names `model.*`, `lm_head.weight`).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let model = LlamaModel::new(cfg, vb.pp("model"))?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains("lm_head.weight") {
            None
        } else {
            Some(Linear::new(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?)
        };
        Ok(LlamaForCausalLM { model, lm_head })
    }

    /// Loads a transformers folder; the builder is returned for its trainable `Var`s.
    pub fn from_pretrained(dir: &Path, opts: &crate::weights::LoadOptions) -> Result<(Self, VarBuilder)> {
        let (cfg, vb) = open(dir, opts)?;
        let m = Self::new(&cfg, vb.clone())?;
        crate::weights::check_all_used(&vb, |n| n.ends_with("rotary_emb.inv_freq"))?;
        Ok((m, vb))
    }

    /// The decoder stack.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Logits `[B, T, vocab]` (in the hidden states' dtype).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.model.forward(input_ids, attention_mask)?;
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => {
                let (b, t, d) = h.dims3()?;
                let w = self.model.embed_tokens();
                Ok(h.reshape((b * t, d))?
                    .matmul(&w.to_dtype(h.dtype())?.t()?)?
                    .reshape((b, t, ()))?)
            }
        }
    }
}

/// The index of each row's last position with `mask` 1, `[B]`; an error for an empty row.
pub fn last_positions(mask: &Tensor) -> Result<Vec<usize>> {
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            r.iter()
                .rposition(|&m| m > 0.0)
                .ok_or_else(|| Error::input("attention_mask", format!("row {i} has no token")))
        })
        .collect()
}

/// Rows `h[b, pos[b]]` of `h` `[B, T, D]`, differentiably.
pub fn gather_positions(h: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let (b, t, d) = h.dims3()?;
    let flat: Vec<u32> = pos.iter().enumerate().map(|(i, &p)| (i * t + p) as u32).collect();
    let idx = Tensor::new(flat.as_slice(), h.device())?;
    Ok(h.reshape((b * t, d))?.index_select(&idx, 0)?)
}

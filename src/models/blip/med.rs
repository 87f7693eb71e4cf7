//! BLIP's text encoder, the "mixture of encoder-decoder" BERT (`ImageReward/models/BLIP/med.py`,
//! `BertModel(add_pooling_layer=False)` in `mode="multimodal"`, adapted from transformers 4.15's
//! `models/bert/modeling_bert.py`): word and absolute position embeddings (no token types), then
//! post-norm layers of self-attention over the text, cross-attention from the text to the image
//! tokens, and a feed-forward block. No dropout at inference.
//!
//! Input: `input_ids` and `attention_mask` `[1, L]` (one prompt, shared by the batch) and the
//! image tokens `[B, N, encoder_width]`. Output: `last_hidden_state` `[B, L, hidden_size]`. Padded
//! text positions are masked out of the self-attention with BERT's additive `-10000`; every image
//! token is attended to (ImageReward's `image_atts` are all ones).

use candle_core::{DType, Tensor};

use super::config::MedConfig;
use crate::nn::{attention_heads, LayerNorm, Linear};
use crate::weights::VarBuilder;
use crate::{Error, Result};

/// BERT's additive mask value for a padded key (`get_extended_attention_mask`).
const MASKED: f64 = -10000.0;

/// `embeddings`: word plus position embeddings, then LayerNorm.
#[derive(Debug, Clone)]
struct BertEmbeddings {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn new(cfg: &MedConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(BertEmbeddings {
            word_embeddings: vb.pp("word_embeddings").get(&[cfg.vocab_size, d], "weight")?,
            position_embeddings: vb
                .pp("position_embeddings")
                .get(&[cfg.max_position_embeddings, d], "weight")?,
            layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `input_ids` `[1, L]` (u32) to `[1, L, D]`.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let l = input_ids.dim(1)?;
        let (vocab, max_positions) = (self.word_embeddings.dim(0)?, self.position_embeddings.dim(0)?);
        if l > max_positions {
            return Err(Error::input(
                "input_ids",
                format!("{l} tokens exceed max_position_embeddings ({max_positions})"),
            ));
        }
        if let Some(&bad) = input_ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&i| i as usize >= vocab)
        {
            return Err(Error::input(
                "input_ids",
                format!("token id {bad} is outside the vocabulary of {vocab} (med_config.json vocab_size)"),
            ));
        }
        let words = self.word_embeddings.index_select(&input_ids.flatten_all()?, 0)?;
        let xs = (words + self.position_embeddings.narrow(0, 0, l)?)?.unsqueeze(0)?;
        self.layer_norm.forward(&xs)
    }
}

/// `attention` or `crossattention`: `self.{query,key,value}` and `output.{dense,LayerNorm}`,
/// post-norm: `LayerNorm(dense(attn(x)) + x)`.
#[derive(Debug, Clone)]
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
}

impl BertAttention {
    /// Keys and values read `kv_width`-wide states: the text's own, or the image tokens'.
    fn new(cfg: &MedConfig, kv_width: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self");
        Ok(BertAttention {
            query: Linear::new(d, d, true, attn.pp("query"))?,
            key: Linear::new(kv_width, d, true, attn.pp("key"))?,
            value: Linear::new(kv_width, d, true, attn.pp("value"))?,
            dense: Linear::new(d, d, true, vb.pp("output").pp("dense"))?,
            layer_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `xs` `[B, L, D]` attends to `context` `[B, N, kv_width]`; `mask` is additive.
    fn forward(&self, xs: &Tensor, context: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = self.query.forward(xs)?;
        let k = self.key.forward(context)?;
        let v = self.value.forward(context)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let ys = attention_heads(&q, &k, &v, self.num_heads, scale, mask)?;
        self.layer_norm.forward(&(self.dense.forward(&ys)? + xs)?)
    }
}

/// `encoder.layer.N`: self-attention, cross-attention, then `intermediate` / `output`.
#[derive(Debug, Clone)]
struct BertLayer {
    attention: BertAttention,
    crossattention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    cfg: MedConfig,
}

impl BertLayer {
    fn new(cfg: &MedConfig, encoder_width: usize, vb: VarBuilder) -> Result<Self> {
        let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(BertLayer {
            attention: BertAttention::new(cfg, d, vb.pp("attention"))?,
            crossattention: BertAttention::new(cfg, encoder_width, vb.pp("crossattention"))?,
            intermediate: Linear::new(d, m, true, vb.pp("intermediate").pp("dense"))?,
            output: Linear::new(m, d, true, vb.pp("output").pp("dense"))?,
            output_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, xs: &Tensor, text_mask: &Tensor, image_tokens: &Tensor) -> Result<Tensor> {
        let xs = self.attention.forward(xs, xs, Some(text_mask))?;
        let xs = self.crossattention.forward(&xs, image_tokens, None)?;
        let hidden = self.cfg.hidden_act.forward(&self.intermediate.forward(&xs)?)?;
        self.output_norm.forward(&(self.output.forward(&hidden)? + xs)?)
    }
}

/// BLIP's `text_encoder`: [`BertEmbeddings`] and `encoder.layer.N`, no pooler.
#[derive(Debug, Clone)]
pub struct BlipTextEncoder {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    config: MedConfig,
}

impl BlipTextEncoder {
    /// Builds the encoder from `vb` at `text_encoder`; the cross-attention keys and values read
    /// `encoder_width`-wide image tokens (the ViT's width, as `BLIP_Pretrain` sets it).
    pub fn new(cfg: &MedConfig, encoder_width: usize, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::new(cfg, encoder_width, vb.pp("encoder").pp("layer").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(BlipTextEncoder {
            embeddings: BertEmbeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            config: cfg.clone(),
        })
    }

    /// The configuration the encoder was built with.
    pub fn config(&self) -> &MedConfig {
        &self.config
    }

    /// `last_hidden_state` `[B, L, D]` for one prompt, `input_ids` and `attention_mask` `[1, L]`
    /// (u32; 1 keeps a token, 0 masks it), against `image_tokens` `[B, N, encoder_width]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, image_tokens: &Tensor) -> Result<Tensor> {
        let b = image_tokens.dim(0)?;
        let xs = self.embeddings.forward(input_ids)?.to_dtype(image_tokens.dtype())?;
        let (_, l, d) = xs.dims3()?;
        let mut xs = xs.broadcast_as((b, l, d))?.contiguous()?;
        // `(1 - mask) * -10000`, broadcast over heads and queries: `[1, 1, 1, L]`.
        let text_mask = attention_mask
            .to_dtype(DType::F32)?
            .affine(-MASKED, MASKED)?
            .reshape((1, 1, 1, l))?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &text_mask, image_tokens)?;
        }
        Ok(xs)
    }
}

//! Multi-head attention with diffusers' `Attention` layout (`to_q`, `to_k`, `to_v`, `to_out.0`),
//! shared by the UNet's transformer blocks and the VAE's mid-block attention.
//! Counterpart: `diffusers/models/attention_processor.py` (`Attention` + `AttnProcessor2_0`).

use candle_core::Tensor;

use crate::nn::{attention_heads, Linear};
use crate::weights::VarBuilder;
use crate::Result;

/// Multi-head attention: `query_dim` in and out, keys from `cross_attention_dim` (itself when
/// `None`), `heads` heads of `dim_head` channels each.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// Loads the projections; `qkv_bias` is diffusers' `bias` (the output projection always has one).
    pub fn new(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let kv_dim = cross_attention_dim.unwrap_or(query_dim);
        Ok(Attention {
            to_q: Linear::new(query_dim, inner, qkv_bias, vb.pp("to_q"))?,
            to_k: Linear::new(kv_dim, inner, qkv_bias, vb.pp("to_k"))?,
            to_v: Linear::new(kv_dim, inner, qkv_bias, vb.pp("to_v"))?,
            to_out: Linear::new(inner, query_dim, true, vb.pp("to_out").pp(0))?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
        })
    }

    /// Attends `xs` `[B, Lq, query_dim]` to `context` `[B, Lk, cross_dim]` (to itself when `None`).
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = attention_heads(&q, &k, &v, self.heads, self.scale, None)?;
        self.to_out.forward(&out)
    }
}

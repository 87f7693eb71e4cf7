//! The UNet's spatial transformer: group norm, projection in, transformer blocks (self-attention,
//! cross-attention, GEGLU feed-forward), projection out, residual.
//! Counterpart: `diffusers/models/transformers/transformer_2d.py` and `models/attention.py`
//! (`BasicTransformerBlock`, `FeedForward`, `GEGLU`).

use candle_core::Tensor;

use crate::models::attention::Attention;
use crate::nn::checkpoint::Recompute;
use crate::nn::conv::Conv2dConfig;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::VarBuilder;
use crate::Result;

/// Settings of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DOptions {
    /// Number of attention heads.
    pub heads: usize,
    /// Channels per head.
    pub dim_head: usize,
    /// Number of transformer blocks (`transformer_layers_per_block`).
    pub num_layers: usize,
    /// Width of the text states.
    pub cross_attention_dim: usize,
    /// Groups of the input group norm.
    pub norm_num_groups: usize,
    /// Linear (`true`, SD 2.x / XL) or 1x1-conv (`false`, SD 1.x) projections.
    pub use_linear_projection: bool,
}

/// `GEGLU` feed-forward: `net.2(h * gelu(gate))` with `[h, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::new(dim, inner * 2, true, vb.pp("net").pp(0).pp("proj"))?,
            out: Linear::new(inner, dim, true, vb.pp("net").pp(2))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gated = crate::ops::geglu::geglu(&self.proj.forward(xs)?)?;
        self.out.forward(&gated)
    }
}

/// `BasicTransformerBlock` with layer norms, self- and cross-attention and GEGLU.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, opts: &Transformer2DOptions, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (opts.heads, opts.dim_head);
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, None, h, d, false, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(dim, Some(opts.cross_attention_dim), h, d, false, vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, Some(context))? + &xs)?;
        Ok((self.ff.forward(&self.norm3.forward(&xs)?)? + xs)?)
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(in_dim: usize, out_dim: usize, linear: bool, vb: VarBuilder) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(in_dim, out_dim, true, vb)?)
        } else {
            Projection::Conv(Conv2d::new(in_dim, out_dim, 1, Conv2dConfig::default(), vb)?)
        })
    }
}

/// `Transformer2DModel` for continuous (latent image) input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    recompute: Recompute,
}

impl Transformer2DModel {
    /// Loads a transformer over `in_channels` feature maps.
    pub fn new(in_channels: usize, opts: Transformer2DOptions, vb: VarBuilder) -> Result<Self> {
        let inner = opts.heads * opts.dim_head;
        let linear = opts.use_linear_projection;
        let transformer_blocks = (0..opts.num_layers)
            .map(|i| BasicTransformerBlock::new(inner, &opts, vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = GroupNorm::new(opts.norm_num_groups, in_channels, 1e-6, vb.pp("norm"))?;
        let proj_in = Projection::new(in_channels, inner, linear, vb.pp("proj_in"))?;
        let proj_out = Projection::new(inner, in_channels, linear, vb.pp("proj_out"))?;
        Ok(Transformer2DModel {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
            recompute: Recompute::new(&vb),
        })
    }

    /// `xs` `[B, C, H, W]` attending to `context` `[B, L, cross_attention_dim]`; recomputed in
    /// the backward pass when the model's recomputation is on.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let f = |t: &Self, xs: &Tensor, context: Option<&Tensor>| {
            t.forward_plain(xs, context.expect("the context is always passed"))
        };
        self.recompute.run(self, f, xs, Some(context))
    }

    fn forward_plain(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            Ok(t.reshape((b, h, w, ch))?.permute((0, 3, 1, 2))?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        Ok((out + xs)?)
    }
}

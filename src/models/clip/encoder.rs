//! CLIP's transformer stack (transformers' `CLIPEncoder` in `models/clip/modeling_clip.py`,
//! open_clip's `Transformer` in `src/open_clip/transformer.py`), shared by the text and vision
//! towers: pre-norm layers of multi-head attention and an MLP, with the text towers' causal mask
//! or no mask, and per-layer activation recomputation ([`Recompute`]).
//!
//! It reads any of three key layouts ([`ClipKeyLayout`]): transformers' separate `q_proj`/`k_proj`/
//! `v_proj` (three matmuls) or open_clip's fused `in_proj_weight` (one matmul, then slices). The
//! layout decides the arithmetic as well as the names, so each checkpoint keeps its own numerics.
//! There is no dropout (`attention_dropout` is 0 in every released checkpoint).

use candle_core::{Device, Tensor};

use super::config::ClipEncoderConfig;
use crate::nn::checkpoint::Recompute;
use crate::nn::{attention_heads, Activation, LayerNorm, Linear};
use crate::weights::VarBuilder;
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
    /// BLIP's timm-style ViT blocks (`models/blip/vit.rs`): `blocks.N.{norm1, attn.qkv (fused
    /// `Linear`), attn.proj, norm2, mlp.fc1, mlp.fc2}`.
    Blip,
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
            ClipKeyLayout::Blip => QkvProjection::Fused {
                in_proj_weight: vb.pp("qkv").get(&[3 * d, d], "weight")?,
                in_proj_bias: vb.pp("qkv").get(&[3 * d], "bias")?,
            },
        };
        let out_proj = match layout {
            ClipKeyLayout::Blip => "proj",
            _ => "out_proj",
        };
        Ok(ClipAttention {
            qkv,
            out_proj: Linear::new(d, d, true, vb.pp(out_proj))?,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `xs` `[B, L, D]`, `mask` `[L, L]` additive or none.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let d = xs.dim(2)?;
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
        let scale = (self.head_dim as f64).powf(-0.5);
        let ys = attention_heads(&q, &k, &v, self.num_heads, scale, mask)?;
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
            ClipKeyLayout::Transformers | ClipKeyLayout::Blip => ("fc1", "fc2"),
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
            ClipKeyLayout::Blip => ("attn", "norm1", "norm2"),
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

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs every layer on `xs` `[B, L, D]`; `mask` `[L, L]` is added to the attention scores
    /// (the text towers' [`causal_mask`]) or absent (the vision tower).
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_inspect(xs, mask, |_, _| {})
    }

    /// [`ClipEncoder::forward`], showing `inspect(i, xs)` the input of each layer `i` (the
    /// embeddings for layer 0), for callers that return hidden states.
    pub fn forward_inspect(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        mut inspect: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            inspect(i, &xs);
            xs = layer.forward(&xs, mask)?;
        }
        Ok(xs)
    }
}

/// The additive causal mask `[L, L]` (f32): 0 on and below the diagonal, -inf above.
pub fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (l, l), device)?)
}

/// A tower's final projection: transformers' `Linear` `[P, D]` (no bias) or open_clip's matrix
/// `[D, P]` applied as `x @ proj`.
#[derive(Debug, Clone)]
pub(super) enum Projection {
    Linear(Linear),
    Matrix(Tensor),
}

impl Projection {
    /// `xs` `[B, D]` to `[B, P]`.
    pub(super) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Projection::Linear(l) => l.forward(xs),
            Projection::Matrix(m) => {
                let gemm = crate::nn::gemm_dtype(xs);
                Ok(xs.to_dtype(gemm)?.matmul(&m.to_dtype(gemm)?)?.to_dtype(xs.dtype())?)
            }
        }
    }
}

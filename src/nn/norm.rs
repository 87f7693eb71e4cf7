//! Layer, group and RMS normalisation, all with a backward pass: layer and group norm run the
//! fused kernels of [`crate::ops`] where they exist (their references elsewhere).

use candle_core::{Tensor, D};

use super::Activation;
use crate::ops::compute_dtype;
use crate::weights::VarBuilder;
use crate::Result;

/// Layer normalisation over the last dimension, with a learned scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of size `dim`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(&[dim], "weight")?,
            bias: vb.get(&[dim], "bias")?,
            eps,
        })
    }

    /// Normalises `xs` `[..., dim]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::layer_norm::layer_norm(
            xs,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Group normalisation over `[B, C, ...]` with per-channel scale and shift.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` of size `channels`; `channels` must divide by `num_groups`.
    pub fn new(num_groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if num_groups == 0 || channels % num_groups != 0 {
            return Err(crate::Error::input(
                vb.path("weight"),
                format!("{channels} channels cannot be split into {num_groups} groups"),
            ));
        }
        Ok(GroupNorm {
            weight: vb.get(&[channels], "weight")?,
            bias: vb.get(&[channels], "bias")?,
            num_groups,
            eps,
        })
    }

    /// Normalises `xs` of shape `[B, C, ...]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::group_norm::group_norm(
            xs,
            &self.weight,
            &self.bias,
            self.num_groups,
            self.eps,
            false,
        )?)
    }

    /// `act(norm(xs))`, with SiLU fused into the normalisation.
    pub fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::Silu => Ok(crate::ops::group_norm::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.num_groups,
                self.eps,
                true,
            )?),
            other => other.forward(&self.forward(xs)?),
        }
    }
}

/// Root-mean-square normalisation over the last dimension with a learned scale (Llama's
/// `LlamaRMSNorm`): `w * x / sqrt(mean(x^2) + eps)`, statistics in at least f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` of size `dim`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(&[dim], "weight")?,
            eps,
        })
    }

    /// Normalises `xs` `[..., dim]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = xs.to_dtype(compute_dtype(xs.dtype()))?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?.to_dtype(xs.dtype())?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

/// L2-normalises `xs` over its last dimension (differentiable); rows of norm 0 are left at 0, as
/// ReNO's aesthetic reward guards them.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let ones = norm.ones_like()?;
    let safe = norm.eq(0.0)?.where_cond(&ones, &norm)?;
    Ok(xs.broadcast_div(&safe)?)
}

//! Layer and group normalisation from composed candle ops, so that both have a backward pass.
//! Statistics are computed in f32 for half-precision inputs.

use candle_core::{DType, Tensor, D};

use crate::weights::VarBuilder;
use crate::Result;

/// The dtype statistics and scores are computed in: f32 for half types, else the input's own.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Normalises `xs` over its last dimension (zero mean, unit variance, at least f32 precision).
fn normalize_last(xs: &Tensor, eps: f64) -> Result<Tensor> {
    let x = xs.to_dtype(compute_dtype(xs.dtype()))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?)
}

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
        let y = normalize_last(xs, self.eps)?.to_dtype(xs.dtype())?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
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
        let dims = xs.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let grouped = xs.reshape((b, self.num_groups, ()))?;
        let y = normalize_last(&grouped, self.eps)?
            .to_dtype(xs.dtype())?
            .reshape(dims.as_slice())?;
        let mut affine_shape = vec![1usize; dims.len()];
        affine_shape[1] = c;
        let w = self.weight.reshape(affine_shape.as_slice())?;
        let bias = self.bias.reshape(affine_shape.as_slice())?;
        Ok(y.broadcast_mul(&w)?.broadcast_add(&bias)?)
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

//! Layer normalisation over the last dimension, with a learned scale and shift.

use candle_core::{Result, Tensor, D};

use super::compute_dtype;

use super::row_norm::RowNorm;

/// `xs` normalised over its last dimension (zero mean, unit variance), in at least f32.
pub(crate) fn normalize_last(xs: &Tensor, eps: f64) -> Result<Tensor> {
    let x = xs.to_dtype(compute_dtype(xs.dtype()))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// The composed reference: `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
pub fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let y = normalize_last(x, eps)?.to_dtype(x.dtype())?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Layer normalisation of `x` `[..., D]` with `weight` and `bias` `[D]`: the fused kernel on CPU,
/// else the reference.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if !super::use_kernel(super::KernelOp::LayerNorm, &[x, weight, bias])
        || weight.elem_count() != d
        || bias.elem_count() != d
    {
        return reference(x, weight, bias, eps);
    }
    let op = RowNorm {
        row_len: d,
        segment: 1,
        groups: 1,
        eps,
        silu: false,
    };
    op.apply(x, weight, bias)
}

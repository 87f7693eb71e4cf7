//! Scaled dot-product attention and softmax from composed ops (differentiable).

use candle_core::{Tensor, D};

use crate::Result;

/// Softmax over the last dimension, composed from ops that all have a backward pass. The
/// subtracted maximum is detached: it cancels out of the result, so its gradient is zero.
pub fn softmax(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = xs.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// `softmax(q k^T * scale + mask) v` for `q` `[..., Lq, D]`, `k`, `v` `[..., Lk, D]`; the mask,
/// when given, is added to the scores (use `-inf` to block). Scores and softmax run in f32 for half-precision inputs.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let compute = crate::nn::norm::compute_dtype(dtype);
    let q32 = q.to_dtype(compute)?;
    let k32 = k.to_dtype(compute)?;
    let scores = (q32.contiguous()?.matmul(&k32.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(compute)?)?,
        None => scores,
    };
    let p = softmax(&scores)?;
    let gemm = super::gemm_dtype(v);
    let out = p.to_dtype(gemm)?.matmul(&v.to_dtype(gemm)?.contiguous()?)?;
    Ok(out.to_dtype(dtype)?)
}

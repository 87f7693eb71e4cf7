//! Group normalisation over `[B, C, ...]` with per-channel scale and shift, optionally followed
//! by SiLU (the norm-then-activation pair of every ResNet block, fused into one pass).

use candle_core::{Result, Tensor};

use super::layer_norm::normalize_last;
use super::row_norm::RowNorm;

/// The composed reference: group norm of `x` `[B, C, ...]` then, with `silu`, `y * sigmoid(y)`.
pub fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let y = normalize_last(&x.reshape((b, groups, ()))?, eps)?
        .to_dtype(x.dtype())?
        .reshape(dims.as_slice())?;
    let mut affine = vec![1usize; dims.len()];
    affine[1] = c;
    let y = y
        .broadcast_mul(&weight.reshape(affine.as_slice())?)?
        .broadcast_add(&bias.reshape(affine.as_slice())?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// Group norm of `x` `[B, C, ...]` in `groups` groups (`C` divisible by `groups`), weight and bias
/// `[C]`, then SiLU when `silu`: the fused kernel on CPU, else the reference.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        candle_core::bail!("group_norm: input {dims:?} cannot be split into {groups} groups");
    }
    if !super::use_kernel(super::KernelOp::GroupNorm, &[x, weight, bias]) {
        return reference(x, weight, bias, groups, eps, silu);
    }
    let spatial: usize = dims[2..].iter().product();
    let op = RowNorm {
        row_len: dims[1] / groups * spatial,
        segment: spatial,
        groups,
        eps,
        silu,
    };
    op.apply(x, weight, bias)
}

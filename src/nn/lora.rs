//! LoRA adapters in forward passes (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models"; PEFT's `tuners/lora/layer.py`): a [`Linear`](super::Linear) or
//! [`Conv2d`](super::Conv2d) with an adapter computes `W x + b + scale * B (A x)`; the base output
//! is not scaled. The adapter's tensors and where they come from are in [`crate::weights::lora`].
//!
//! A and B are f32 master weights; they are cast to the dtype the layer computes in.

use candle_core::Tensor;

pub use crate::weights::lora::{LoraAdapter, LoraConfig, LoraSource};
use crate::{Error, Result};

impl LoraAdapter {
    /// `scale * B (A x)` for `xs` of shape `[rows, in]`, giving `[rows, out]` in `xs`'s dtype.
    pub fn linear_delta(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let a = self.a.to_dtype(dtype)?;
        let b = self.b.to_dtype(dtype)?;
        Ok(xs.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(self.scale, 0.0)?)
    }

    /// `scale * B (A * x)` for `xs` of shape `[B, C_in, H, W]`: A is a convolution with the base
    /// convolution's `padding` and `stride`, B a 1x1 convolution; in `xs`'s dtype.
    pub fn conv_delta(&self, xs: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        let dtype = xs.dtype();
        let a = self.a.to_dtype(dtype)?;
        let b = self.b.to_dtype(dtype)?;
        if a.rank() != 4 || b.rank() != 4 {
            return Err(Error::input(
                "conv LoRA",
                format!("A and B must be 4-D, got {:?} and {:?}", a.dims(), b.dims()),
            ));
        }
        let down = xs.conv2d(&a, padding, stride, 1, 1)?;
        Ok(down.conv2d(&b, 0, 1, 1, 1)?.affine(self.scale, 0.0)?)
    }
}

/// `weight` with `lora`'s update merged ([`LoraAdapter::fuse`]), or `weight` itself without an
/// adapter: the weight a layer with an optional LoRA computes with.
pub fn fused_weight(weight: &Tensor, lora: Option<&LoraAdapter>) -> Result<Tensor> {
    match lora {
        Some(l) => l.fuse(weight),
        None => Ok(weight.clone()),
    }
}

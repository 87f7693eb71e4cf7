//! A fully connected layer, `y = x W^T + b`, with PyTorch's `[out, in]` weight layout, and an
//! optional LoRA adapter (`y + scale * B (A x)`, see [`super::lora`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Module, Tensor};

use super::lora::LoraAdapter;
use crate::weights::VarBuilder;
use crate::Result;

/// A linear layer; the weight is `[out_features, in_features]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
    /// The model's activation-recomputation switch ([`VarBuilder::recompute_flag`]).
    recompute: Arc<AtomicBool>,
}

super::lora_weight_accessors!(Linear, "[out, in]");

impl Linear {
    /// Loads `weight` (and `bias` when `bias` is true) under `vb`, and the LoRA adapter `vb` has
    /// for this module, if any ([`VarBuilder::lora`]).
    pub fn new(in_features: usize, out_features: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(&[out_features, in_features], "weight")?;
        let bias = if bias {
            Some(vb.get(&[out_features], "bias")?)
        } else {
            None
        };
        let lora = vb.lora(&[out_features, in_features])?;
        Ok(Linear {
            weight,
            bias,
            lora,
            recompute: vb.recompute_flag(),
        })
    }

    /// Applies the layer to `xs` of shape `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let in_features = *dims.last().expect("linear input has at least one dim");
        let rows = xs.elem_count() / in_features.max(1);
        let dtype = xs.dtype();
        let gemm = super::gemm_dtype(xs);
        let x = xs.reshape((rows, in_features))?;
        // The adapter joins the frozen op unless blocks are recomputed: measured on the SD 1.5
        // UNet (LoRA 8, f32, 256x256), the fused adapter cut a step's peak from 9.46 to 5.60
        // GiB without recomputation but raised it from 4.14 to 4.79 GiB with it (why is not
        // understood yet), where the adapter as composed ops does better.
        let fuse_lora = !self.recompute.load(Ordering::Relaxed);
        let lora = self.lora().filter(|_| fuse_lora).map(|l| (&l.a, &l.b, l.scale));
        let fused = match (self.lora(), lora) {
            (Some(_), None) => None,
            _ => crate::ops::frozen::frozen_linear(&x, &self.weight, self.bias.as_ref(), lora)?,
        };
        // A trainable layer without an adapter: one op on the CPU as well.
        let fused = match fused {
            None if self.lora().is_none() => crate::ops::linear::linear(&x, &self.weight, self.bias.as_ref())?,
            taken => taken,
        };
        let ys = match fused {
            Some(ys) => ys,
            // A GPU, or an adapter on a trainable base or under recomputation: composed ops,
            // half types on the CPU widened.
            None => {
                let x2 = x.to_dtype(gemm)?;
                let ys = x2.matmul(&self.weight.to_dtype(gemm)?.t()?)?;
                let ys = match self.lora() {
                    Some(l) => (ys + l.linear_delta(&x2)?)?,
                    None => ys,
                };
                let ys = ys.to_dtype(dtype)?;
                match &self.bias {
                    Some(b) => ys.broadcast_add(b)?,
                    None => ys,
                }
            }
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = self.weight.dim(0)?;
        Ok(ys.reshape(out_dims)?)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, xs).map_err(candle_core::Error::wrap)
    }
}

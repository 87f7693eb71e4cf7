//! A 2-D convolution with PyTorch's `[out, in/groups, kh, kw]` weight layout, and an optional
//! LoRA adapter (`y + scale * B (A * x)`, see [`super::lora`]).

use candle_core::Tensor;

use super::lora::LoraAdapter;
use crate::weights::VarBuilder;
use crate::{Error, Result};

/// Stride, padding and groups of a [`Conv2d`].
#[derive(Debug, Clone, Copy)]
pub struct Conv2dConfig {
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Number of groups (1 for a dense convolution).
    pub groups: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Conv2dConfig {
            stride: 1,
            padding: 0,
            groups: 1,
        }
    }
}

/// A 2-D convolution with a bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
    lora: Option<LoraAdapter>,
}

super::lora_weight_accessors!(Conv2d, "[out, in/groups, k, k]");

impl Conv2d {
    /// Loads a `kernel x kernel` convolution from `in_channels` to `out_channels` with a bias, and
    /// the LoRA adapter `vb` has for this module, if any ([`VarBuilder::lora`]; dense
    /// convolutions only).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shape = [out_channels, in_channels / cfg.groups, kernel, kernel];
        let weight = vb.get(&shape, "weight")?;
        let bias = Some(vb.get(&[out_channels], "bias")?);
        let lora = vb.lora(&shape)?;
        if lora.is_some() && cfg.groups != 1 {
            return Err(Error::input(
                vb.path("weight"),
                format!("LoRA on a grouped convolution (groups {}) is not supported", cfg.groups),
            ));
        }
        Ok(Conv2d {
            weight,
            bias,
            cfg,
            lora,
        })
    }

    /// A same-size `kernel x kernel` convolution (padding `kernel / 2`, stride 1).
    pub fn same(in_channels: usize, out_channels: usize, kernel: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(
            in_channels,
            out_channels,
            kernel,
            Conv2dConfig {
                padding: kernel / 2,
                ..Default::default()
            },
            vb,
        )
    }

    /// Applies the convolution to `xs` of shape `[B, C_in, H, W]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_shifted(xs, None)
    }

    /// The convolution plus `shift` `[B, C_out]` per sample and channel (a ResNet block's time
    /// embedding), added inside the fused op with the bias.
    pub fn forward_shifted(&self, xs: &Tensor, shift: Option<&Tensor>) -> Result<Tensor> {
        // The fused kernel computes half types in f32 itself; widening here would keep an f32
        // copy of the input alive in the graph.
        let gemm = if self.lora().is_none() && crate::ops::conv2d::kernel_takes(xs, &self.weight, self.cfg.groups) {
            xs.dtype()
        } else {
            super::gemm_dtype(xs)
        };
        let weight = self.weight.to_dtype(gemm)?;
        let (input, padding) = match self.exact_cover(xs)? {
            Some(cropped) => (cropped.to_dtype(gemm)?, 0),
            None => (xs.to_dtype(gemm)?, self.cfg.padding),
        };
        if let (None, Some(b), 1) = (self.lora(), &self.bias, self.cfg.groups) {
            if gemm == xs.dtype() {
                let b = match shift {
                    Some(t) => t.broadcast_add(&b.unsqueeze(0)?)?,
                    None => b.clone(),
                };
                let stride = self.cfg.stride;
                return Ok(crate::ops::conv2d::conv2d_biased(&input, &weight, &b, stride, padding)?);
            }
        }
        let ys = if self.cfg.groups == 1 {
            crate::ops::conv2d::conv2d(&input, &weight, self.cfg.stride, padding)?
        } else {
            input.conv2d(&weight, padding, self.cfg.stride, 1, self.cfg.groups)?
        };
        let ys = match self.lora() {
            Some(l) => (ys + l.conv_delta(&input, padding, self.cfg.stride)?)?,
            None => ys,
        };
        let ys = ys.to_dtype(xs.dtype())?;
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => ys,
        };
        Ok(match shift {
            Some(t) => ys.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?,
            None => ys,
        })
    }

    /// For strided convolutions whose windows leave trailing rows or columns unread: the
    /// explicitly padded input cut to exactly what the windows read. candle's conv2d backward
    /// derives one output padding from the height and applies it to the width too, which breaks
    /// (shape error) when the two leftovers differ; with nothing left over it is exact.
    fn exact_cover(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let (s, p) = (self.cfg.stride, self.cfg.padding);
        if s == 1 {
            return Ok(None);
        }
        let k = self.weight.dim(2)?;
        let (_, _, h, w) = xs.dims4()?;
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        if hp < k || wp < k || ((hp - k) % s == 0 && (wp - k) % s == 0) {
            return Ok(None);
        }
        let padded = if p > 0 {
            xs.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
        } else {
            xs.clone()
        };
        let cut = |n: usize| n - (n - k) % s;
        Ok(Some(padded.narrow(2, 0, cut(hp))?.narrow(3, 0, cut(wp))?))
    }
}

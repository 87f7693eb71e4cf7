//! ResNet blocks and the 2x resamplers shared by the UNet and the VAE.
//! Counterpart: `diffusers/models/resnet.py` (`ResnetBlock2D`), `downsampling.py`, `upsampling.py`.

use candle_core::Tensor;

use crate::nn::checkpoint::Recompute;
use crate::nn::conv::Conv2dConfig;
use crate::nn::{Activation, Conv2d, GroupNorm, Linear};
use crate::weights::VarBuilder;
use crate::Result;

/// Settings of a [`ResnetBlock2D`] besides its channel counts.
#[derive(Debug, Clone, Copy)]
pub struct ResnetOptions {
    /// Width of the time embedding, `None` for the VAE (no time input).
    pub temb_channels: Option<usize>,
    /// Number of groups of both group norms.
    pub groups: usize,
    /// Group-norm epsilon.
    pub eps: f64,
    /// The nonlinearity (`act_fn`).
    pub act: Activation,
    /// The output is divided by this (`output_scale_factor`).
    pub output_scale_factor: f64,
}

/// `ResnetBlock2D` with `time_embedding_norm="default"`: norm, act, conv, + time projection,
/// norm, act, conv, plus a 1x1 shortcut when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
    recompute: Recompute,
}

impl ResnetBlock2D {
    /// Loads a block from `in_channels` to `out_channels`.
    pub fn new(in_channels: usize, out_channels: usize, opts: ResnetOptions, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(
                in_channels,
                out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        let time_emb_proj = match opts.temb_channels {
            Some(t) => Some(Linear::new(t, out_channels, true, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm1 = GroupNorm::new(opts.groups, in_channels, opts.eps, vb.pp("norm1"))?;
        let conv1 = Conv2d::same(in_channels, out_channels, 3, vb.pp("conv1"))?;
        let norm2 = GroupNorm::new(opts.groups, out_channels, opts.eps, vb.pp("norm2"))?;
        let conv2 = Conv2d::same(out_channels, out_channels, 3, vb.pp("conv2"))?;
        Ok(ResnetBlock2D {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            act: opts.act,
            output_scale_factor: opts.output_scale_factor,
            recompute: Recompute::new(&vb),
        })
    }

    /// `xs` `[B, C_in, H, W]`, `temb` `[B, temb_channels]` (ignored by blocks without a time input);
    /// recomputed in the backward pass when the model's recomputation is on.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        self.recompute.run(self, Self::forward_plain, xs, temb)
    }

    fn forward_plain(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let shift = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.act.forward(temb)?)?),
            _ => None,
        };
        let h = self
            .conv1
            .forward_shifted(&self.norm1.forward_act(xs, self.act)?, shift.as_ref())?;
        let h = self.conv2.forward(&self.norm2.forward_act(&h, self.act)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        Ok(if self.output_scale_factor != 1.0 {
            (out / self.output_scale_factor)?
        } else {
            out
        })
    }
}

/// `Downsample2D` with a strided 3x3 convolution (`use_conv=True`).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// Loads `conv`; with `padding` 0 the input is padded on the right and bottom only, as in
    /// diffusers (and the VAE encoder).
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding,
            groups: 1,
        };
        Ok(Downsample2D {
            conv: Conv2d::new(channels, channels, 3, cfg, vb.pp("conv"))?,
            padding,
        })
    }

    /// Halves the spatial size of `xs` `[B, C, H, W]` (rounding up).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D`: nearest-neighbour 2x (or to an explicit size), then a 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads `conv`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Upsample2D {
            conv: Conv2d::same(channels, channels, 3, vb.pp("conv"))?,
        })
    }

    /// Upsamples `xs` to `size` `(H, W)`, or doubles it when `None`.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = if (th, tw) == (2 * h, 2 * w) {
            // The backward of candle's nearest upsampling is a convolution, which has no bf16
            // kernel on CPU: upsample in the gemm dtype there.
            let gemm = crate::nn::gemm_dtype(xs);
            xs.to_dtype(gemm)?.upsample_nearest2d(th, tw)?.to_dtype(xs.dtype())?
        } else {
            // candle's nearest upsampling has no backward for non-integer scales; gathering the
            // source rows and columns (PyTorch's `floor(dst * in / out)`) has one.
            let index = |n_in: usize, n_out: usize| -> Result<Tensor> {
                let idx: Vec<u32> = (0..n_out).map(|i| ((i * n_in) / n_out) as u32).collect();
                Ok(Tensor::from_vec(idx, n_out, xs.device())?)
            };
            xs.index_select(&index(h, th)?, 2)?.index_select(&index(w, tw)?, 3)?
        };
        self.conv.forward(&up)
    }
}

//! The VAE's encoder and decoder networks.
//! Counterpart: `diffusers/models/autoencoders/vae.py` (`Encoder`, `Decoder`) and the
//! `DownEncoderBlock2D` / `UpDecoderBlock2D` / `UNetMidBlock2D` blocks they use.

use candle_core::Tensor;

use crate::models::attention::Attention;
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetOptions, Upsample2D};
use crate::nn::{Activation, Conv2d, GroupNorm};
use crate::weights::VarBuilder;
use crate::Result;

/// Epsilon of every VAE group norm (fixed in diffusers).
const EPS: f64 = 1e-6;

/// Architecture shared by [`Encoder`] and [`Decoder`].
#[derive(Debug, Clone)]
pub struct CoderConfig {
    /// Channels of each resolution level, from the image side.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Nonlinearity.
    pub act: Activation,
    /// Whether the mid block has its self-attention.
    pub mid_block_add_attention: bool,
}

impl CoderConfig {
    fn resnet(&self) -> ResnetOptions {
        ResnetOptions {
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: EPS,
            act: self.act,
            output_scale_factor: 1.0,
        }
    }
}

/// Single-head self-attention over all pixels with a group norm and a residual.
#[derive(Debug, Clone)]
struct AttentionBlock {
    group_norm: GroupNorm,
    attn: Attention,
}

impl AttentionBlock {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(AttentionBlock {
            group_norm: GroupNorm::new(groups, channels, EPS, vb.pp("group_norm"))?,
            attn: Attention::new(channels, None, 1, channels, true, vb)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.group_norm.forward(xs)?;
        let tokens = normed.reshape((b, c, h * w))?.transpose(1, 2)?;
        let out = self.attn.forward(&tokens, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + xs)?)
    }
}

/// `count` resnets of block `vb` (`vb.resnets.<j>`), the first from `in_ch` channels, all to
/// `out_ch`.
fn resnet_chain(
    cfg: &CoderConfig,
    count: usize,
    (in_ch, out_ch): (usize, usize),
    vb: &VarBuilder,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|j| {
            let from = if j == 0 { in_ch } else { out_ch };
            ResnetBlock2D::new(from, out_ch, cfg.resnet(), vb.pp("resnets").pp(j))
        })
        .collect()
}

/// `UNetMidBlock2D` without time input: resnet, (attention,) resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<AttentionBlock>,
}

impl MidBlock {
    fn new(channels: usize, cfg: &CoderConfig, vb: VarBuilder) -> Result<Self> {
        let r = cfg.resnet();
        let attention = if cfg.mid_block_add_attention {
            Some(AttentionBlock::new(
                channels,
                cfg.norm_num_groups,
                vb.pp("attentions").pp(0),
            )?)
        } else {
            None
        };
        Ok(MidBlock {
            resnets: [
                ResnetBlock2D::new(channels, channels, r, vb.pp("resnets").pp(0))?,
                ResnetBlock2D::new(channels, channels, r, vb.pp("resnets").pp(1))?,
            ],
            attention,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, None)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs)?;
        }
        self.resnets[1].forward(&xs, None)
    }
}

/// The encoder: image `[B, C_img, H, W]` to moments `[B, 2 * latent, H/f, W/f]`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    /// Loads the encoder (diffusers' `double_z=True`).
    pub fn new(in_channels: usize, latent_channels: usize, cfg: &CoderConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let conv_in = Conv2d::same(in_channels, boc[0], 3, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch;
            let bvb = vb.pp("down_blocks").pp(i);
            let resnets = resnet_chain(cfg, cfg.layers_per_block, (in_ch, out_ch), &bvb)?;
            let down = if i + 1 < n {
                Some(Downsample2D::new(out_ch, 0, bvb.pp("downsamplers").pp(0))?)
            } else {
                None
            };
            down_blocks.push((resnets, down));
        }
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(boc[n - 1], cfg, vb.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(cfg.norm_num_groups, boc[n - 1], EPS, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::same(boc[n - 1], 2 * latent_channels, 3, vb.pp("conv_out"))?,
            act: cfg.act,
        })
    }

    /// Encodes `xs` (images in [-1, 1]).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for (resnets, down) in &self.down_blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = down {
                xs = d.forward(&xs)?;
            }
        }
        let xs = self.mid_block.forward(&xs)?;
        self.conv_out.forward(&self.conv_norm_out.forward_act(&xs, self.act)?)
    }
}

/// The decoder: latents `[B, latent, h, w]` to images `[B, C_img, h*f, w*f]` in about [-1, 1].
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    /// Loads the decoder.
    pub fn new(latent_channels: usize, out_channels: usize, cfg: &CoderConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let conv_in = Conv2d::same(latent_channels, rev[0], 3, vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(rev[0], cfg, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            let bvb = vb.pp("up_blocks").pp(i);
            let resnets = resnet_chain(cfg, cfg.layers_per_block + 1, (prev, out_ch), &bvb)?;
            let up = if i + 1 < n {
                Some(Upsample2D::new(out_ch, bvb.pp("upsamplers").pp(0))?)
            } else {
                None
            };
            up_blocks.push((resnets, up));
        }
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(cfg.norm_num_groups, rev[n - 1], EPS, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::same(rev[n - 1], out_channels, 3, vb.pp("conv_out"))?,
            act: cfg.act,
        })
    }

    /// Decodes latents (already divided by the scaling factor).
    pub fn forward(&self, zs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(zs)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for (resnets, up) in &self.up_blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = up {
                xs = u.forward(&xs, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_act(&xs, self.act)?)
    }
}

//! The UNet's down, mid and up blocks, with and without cross-attention.
//! Counterpart: `diffusers/models/unets/unet_2d_blocks.py` (`DownBlock2D`, `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`).

use candle_core::Tensor;

use super::transformer_2d::{Transformer2DModel, Transformer2DOptions};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetOptions, Upsample2D};
use crate::weights::VarBuilder;
use crate::Result;

/// Attention settings of a block; `None` for blocks without cross-attention.
#[derive(Debug, Clone, Copy)]
pub struct BlockAttention {
    /// Number of heads (diffusers' per-block `num_attention_heads`).
    pub heads: usize,
    /// Transformer blocks per attention (`transformer_layers_per_block`).
    pub num_layers: usize,
    /// Width of the text states.
    pub cross_attention_dim: usize,
    /// Linear projections in and out of the transformer.
    pub use_linear_projection: bool,
}

impl BlockAttention {
    fn transformer(&self, channels: usize, groups: usize, vb: VarBuilder) -> Result<Transformer2DModel> {
        let opts = Transformer2DOptions {
            heads: self.heads,
            dim_head: channels / self.heads,
            num_layers: self.num_layers,
            cross_attention_dim: self.cross_attention_dim,
            norm_num_groups: groups,
            use_linear_projection: self.use_linear_projection,
        };
        Transformer2DModel::new(channels, opts, vb)
    }
}

/// A down block: `num_layers` resnets, each followed by a transformer when `attention` is set,
/// then an optional strided-conv downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Loads `DownBlock2D` (no attention) or `CrossAttnDownBlock2D`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        resnet: ResnetOptions,
        attention: Option<BlockAttention>,
        downsample_padding: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let cin = if i == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock2D::new(cin, out_channels, resnet, vb.pp("resnets").pp(i))?);
            if let Some(a) = &attention {
                attentions.push(a.transformer(out_channels, resnet.groups, vb.pp("attentions").pp(i))?);
            }
        }
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::new(out_channels, p, vb.pp("downsamplers").pp(0))?),
            None => None,
        };
        Ok(DownBlock {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the states it hands to the up path.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            states.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) once.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Loads the mid block over `channels`.
    pub fn new(channels: usize, resnet: ResnetOptions, attention: BlockAttention, vb: VarBuilder) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(channels, channels, resnet, vb.pp("resnets").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let attentions = vec![attention.transformer(channels, resnet.groups, vb.pp("attentions").pp(0))?];
        Ok(MidBlock { resnets, attentions })
    }

    /// Applies the block.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = attn.forward(&xs, context)?;
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

/// An up block: resnets over the concatenation of the running state and a skip state, each
/// followed by a transformer when `attention` is set, then an optional upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Channel counts of an [`UpBlock`].
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    /// Channels of the skip state used by the last resnet (the previous down level's width).
    pub in_channels: usize,
    /// This block's width.
    pub out_channels: usize,
    /// Width of the state coming from the block below.
    pub prev_output_channels: usize,
}

impl UpBlock {
    /// Loads `UpBlock2D` (no attention) or `CrossAttnUpBlock2D` with `num_layers` resnets.
    pub fn new(
        ch: UpChannels,
        num_layers: usize,
        resnet: ResnetOptions,
        attention: Option<BlockAttention>,
        add_upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let skip = if i == num_layers - 1 {
                ch.in_channels
            } else {
                ch.out_channels
            };
            let cin = if i == 0 {
                ch.prev_output_channels
            } else {
                ch.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                cin + skip,
                ch.out_channels,
                resnet,
                vb.pp("resnets").pp(i),
            )?);
            if let Some(a) = &attention {
                attentions.push(a.transformer(ch.out_channels, resnet.groups, vb.pp("attentions").pp(i))?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(ch.out_channels, vb.pp("upsamplers").pp(0))?)
        } else {
            None
        };
        Ok(UpBlock {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip states this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Applies the block; `skips` are consumed from the end; `upsample_size` is the spatial size
    /// to upsample to (the next skip state's), `None` for plain doubling.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the UNet hands each up block enough skip states");
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            xs = up.forward(&xs, upsample_size)?;
        }
        Ok(xs)
    }
}

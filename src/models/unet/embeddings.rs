//! Sinusoidal timestep features and the time-embedding MLP.
//! Counterpart: `diffusers/models/embeddings.py` (`get_timestep_embedding`, `Timesteps`,
//! `TimestepEmbedding`).

use candle_core::{DType, Tensor};

use crate::nn::{Activation, Linear};
use crate::weights::VarBuilder;
use crate::Result;

/// Sinusoidal features of per-sample (possibly fractional) timesteps.
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    /// Output width.
    pub num_channels: usize,
    /// Put cosines first (`flip_sin_to_cos`).
    pub flip_sin_to_cos: bool,
    /// `freq_shift` (diffusers' `downscale_freq_shift`).
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    /// `timesteps` `[N]` (any float or integer dtype) to f32 features `[N, num_channels]`.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let half = self.num_channels / 2;
        let device = timesteps.device();
        // Frequencies in f32 as diffusers computes them, so float rounding matches.
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - self.downscale_freq_shift as f32);
                exponent.exp()
            })
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), device)?;
        let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
        let args = t.broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        Ok(if self.num_channels % 2 == 1 {
            emb.pad_with_zeros(1, 0, 1)?
        } else {
            emb
        })
    }
}

/// `TimestepEmbedding`: `linear_2(act(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in_channels` to `time_embed_dim`) and `linear_2`.
    pub fn new(in_channels: usize, time_embed_dim: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(in_channels, time_embed_dim, true, vb.pp("linear_1"))?,
            linear_2: Linear::new(time_embed_dim, time_embed_dim, true, vb.pp("linear_2"))?,
            act,
        })
    }

    /// `xs` `[B, in_channels]` to `[B, time_embed_dim]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.act.forward(&self.linear_1.forward(xs)?)?)
    }
}

//! Activation functions by their Hugging Face config names.

use candle_core::Tensor;
use serde::Deserialize;

use crate::Result;

/// An activation function, deserialised from config strings such as `"silu"` or `"quick_gelu"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    #[serde(alias = "swish", rename = "silu")]
    Silu,
    /// Exact GELU, `x * Phi(x)` (PyTorch's default `gelu`).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU with the tanh approximation.
    #[serde(alias = "gelu_new", alias = "gelu_fast", rename = "gelu_pytorch_tanh")]
    GeluTanh,
    /// CLIP's `x * sigmoid(1.702 x)`.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
}

impl Activation {
    /// Applies the activation elementwise.
    pub fn forward(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => xs.silu()?,
            Activation::Gelu => xs.gelu_erf()?,
            Activation::GeluTanh => xs.gelu()?,
            Activation::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
        })
    }
}

//! A fully connected layer, `y = x W^T + b`, with PyTorch's `[out, in]` weight layout.

use candle_core::{Module, Tensor};

use crate::weights::VarBuilder;
use crate::Result;

/// A linear layer; the weight is `[out_features, in_features]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias` is true) under `vb`.
    pub fn new(in_features: usize, out_features: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(&[out_features, in_features], "weight")?;
        let bias = if bias {
            Some(vb.get(&[out_features], "bias")?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the layer to `xs` of shape `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let in_features = *dims.last().expect("linear input has at least one dim");
        let rows = xs.elem_count() / in_features.max(1);
        let dtype = xs.dtype();
        let gemm = super::gemm_dtype(xs);
        let ys = xs
            .reshape((rows, in_features))?
            .to_dtype(gemm)?
            .matmul(&self.weight.to_dtype(gemm)?.t()?)?;
        let ys = ys.to_dtype(dtype)?;
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
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

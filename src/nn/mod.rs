//! Shared layers, all differentiable: every op here has a backward pass (candle ops or the
//! kernels of [`crate::ops`]), unlike candle-nn's `layer_norm` / `softmax_last_dim` fast paths,
//! whose gradients are silently missing.

pub mod activation;
pub mod checkpoint;
pub mod conv;
pub mod linear;
pub mod lora;
pub mod norm;

pub use crate::ops::attention::attention as scaled_dot_product_attention;
pub use crate::ops::softmax::softmax;
pub use activation::Activation;
pub use conv::Conv2d;
pub use linear::Linear;
pub use lora::LoraAdapter;
pub use norm::{l2_normalize, GroupNorm, LayerNorm, RmsNorm};

use candle_core::{DType, Tensor};

/// The dtype matmuls and convolutions on `t` run in: candle's CPU backend has no bf16 kernels
/// for them, so bf16 tensors on the CPU compute in f32 (and the result is cast back).
pub(crate) fn gemm_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::BF16 && t.device().is_cpu() {
        DType::F32
    } else {
        t.dtype()
    }
}

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

pub(crate) use crate::ops::gemm_dtype;

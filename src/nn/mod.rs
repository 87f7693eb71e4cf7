//! Shared layers, all differentiable: every op here has a backward pass in candle (composed
//! ops), unlike candle-nn's `layer_norm` / `softmax_last_dim` fast paths, whose gradients are
//! silently missing.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod linear;
pub mod norm;

pub use activation::Activation;
pub use attention::{scaled_dot_product_attention, softmax};
pub use conv::Conv2d;
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm};

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
pub use crate::ops::attention::attention_heads;
pub use crate::ops::softmax::softmax;
pub use activation::Activation;
pub use conv::Conv2d;
pub use linear::Linear;
pub use lora::LoraAdapter;
pub use norm::{l2_normalize, GroupNorm, LayerNorm, RmsNorm};

pub(crate) use crate::ops::gemm_dtype;

/// The accessors of a layer with a `weight` (laid out as `$layout`) and an optional `lora`
/// adapter: the base weight, the adapter, and the two merged.
macro_rules! lora_weight_accessors {
    ($layer:ty, $layout:literal) => {
        impl $layer {
            #[doc = concat!("The base weight, `", $layout, "` (without the LoRA update).")]
            pub fn weight(&self) -> &Tensor {
                &self.weight
            }

            /// The LoRA adapter, if any and switched on ([`LoraAdapter::switch`]).
            pub fn lora(&self) -> Option<&LoraAdapter> {
                self.lora.as_ref().filter(|l| l.switch.is_on())
            }

            /// The weight with the LoRA update merged, `W + scale * B @ A` (B @ A over the
            /// flattened kernel of a convolution; computed in f32, in the weight's dtype); the
            /// base weight without a LoRA.
            pub fn fused_weight(&self) -> Result<Tensor> {
                super::lora::fused_weight(&self.weight, self.lora())
            }
        }
    };
}
use lora_weight_accessors;

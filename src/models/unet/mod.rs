//! The conditional UNet and its parts.

pub mod config;
pub mod embeddings;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use unet_2d_condition::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel};

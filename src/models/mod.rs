//! Models: CLIP text encoders, BLIP (ImageReward's towers), UNet, VAE, and Llama-family language models.
pub mod attention;
pub mod blip;
pub mod clip;
pub mod config;
pub mod llama;
pub mod resnet;
pub mod unet;
pub mod vae;

//! Models: CLIP text encoders, UNet, VAE.
pub mod attention;
pub mod clip;
pub mod config;
pub mod resnet;
pub mod unet;
pub mod vae;

//! Models: CLIP text encoders, UNet, VAE.
pub mod clip;
pub mod unet;
pub mod vae;
pub mod attention;
pub mod config;
pub mod resnet;

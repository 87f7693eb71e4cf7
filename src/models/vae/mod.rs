//! The KL autoencoder (VAE).

pub mod autoencoder_kl;
#[allow(clippy::module_inception)] // diffusers' file name: models/autoencoders/vae.py
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};

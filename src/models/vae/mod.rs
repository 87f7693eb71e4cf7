//! The KL autoencoder (VAE).

pub mod autoencoder_kl;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};

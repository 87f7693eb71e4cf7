//! Text-to-image sampling: loading a whole pipeline ([`pipeline`]) and generating with it
//! (prompt encoding, classifier-free guidance, the denoising loop, VAE decoding).

pub mod budget;
pub mod image_io;
pub mod load;
pub mod pipeline;

pub use pipeline::{GenerateRequest, Generated, PipelineKind, StableDiffusionPipeline};

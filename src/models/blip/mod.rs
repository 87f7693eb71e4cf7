//! BLIP (Li et al. 2022, arXiv 2201.12086) as ImageReward uses it (`ImageReward/models/BLIP/`):
//! the ViT image encoder ([`vit`]) and the BERT text encoder with cross-attention to the image
//! tokens ([`med`]), sized by `med_config.json` and the checkpoint's shapes ([`config`]).

pub mod config;
pub mod med;
pub mod vit;

pub use config::{BlipVisionConfig, MedConfig};
pub use med::BlipTextEncoder;
pub use vit::BlipVisionTransformer;

//! CLIP as transformers builds it (`models/clip/modeling_clip.py`) and as open_clip does: SD
//! 1.x/2.x's `CLIPTextModel`, SDXL's `CLIPTextModelWithProjection`, the vision tower and whole
//! `CLIPModel`s for reward models, differentiable end to end. One transformer stack
//! ([`encoder`]) serves every tower; configs are in [`config`], open_clip's in [`open_clip`].

pub mod clip_model;
pub mod config;
pub mod encoder;
pub mod open_clip;
pub mod text_model;
pub mod vision_model;

pub use text_model::{
    is_known_buffer, pooled_positions, ClipPooling, ClipTextArchitecture, ClipTextConfig, ClipTextForwardOptions,
    ClipTextLayout, ClipTextModel, ClipTextOutput,
};

//! CLIP text encoders as transformers builds them (`models/clip/modeling_clip.py`): SD 1.x/2.x's
//! `CLIPTextModel`, SDXL's `CLIPTextModelWithProjection` and the text half of a `CLIPModel`,
//! differentiable end to end. See [`text_model`].

pub mod clip_model;
pub mod text_model;
pub mod vision_model;

pub use text_model::{
    is_known_buffer, pooled_positions, ClipPooling, ClipTextArchitecture, ClipTextConfig, ClipTextForwardOptions,
    ClipTextLayout, ClipTextModel, ClipTextOutput,
};

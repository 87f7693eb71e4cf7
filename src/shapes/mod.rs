//! The shapes world, an application of the library rather than a part of it: a procedural
//! text-to-image world with a known truth ([`world`]: scenes, captions and rendering; [`rater`]:
//! the ground-truth rater), the pretrainer that made the embedded tiny model from it
//! ([`pretrain`]), that model and its reward ([`assets`]), and the demo that aligns it
//! ([`demo`], with its reward fine-tuning row in [`reward_demo`]). Only the command line uses
//! this module; nothing else in the library does.

pub mod assets;
pub mod demo;
pub mod pretrain;
pub mod rater;
pub mod reward_demo;
pub mod world;

pub use rater::{preference_probability, rate, Rating};
pub use world::{Colour, Prompt, Scene, Shape};

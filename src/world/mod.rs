//! The shapes world: a procedural text-to-image world with a known truth, in which the embedded
//! tiny model is trained and preference alignment is measured ([`shapes`]: scenes, captions and
//! rendering; [`rater`]: the ground-truth rater).

pub mod rater;
pub mod shapes;

pub use rater::{preference_probability, rate, Rating};
pub use shapes::{Colour, Prompt, Scene, Shape};

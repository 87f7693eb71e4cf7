//! Preference objectives over per-sample log-likelihood proxies, shared by every model family.
//!
//! - [`objective`]: the loss table (DPO-family losses, MaPO's margin form) and its metrics; it
//!   knows nothing about diffusion or language models.
//! - [`diffusion`]: the denoising-error proxy (`-0.5 * per-sample MSE`), DCPO's per-side
//!   captions, SmPO's soft-label scale and ReNoise inversion, and the batch format.

pub mod diffusion;
pub mod objective;

pub use objective::{LossType, Metrics, Objective, PairScores, PreferenceLoss};

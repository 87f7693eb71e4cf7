//! Preference objectives, shared by the diffusion and language-model sides: the loss table
//! ([`objective`]: DPO family, SimPO, ORPO, MaPO), KTO, reward heads (Bradley-Terry and the
//! General Preference Model), reward transforms and ranking metrics. [`diffusion`] supplies
//! the denoising-error proxy; `crate::lm` the sequence log-probabilities.

pub mod diffusion;
pub mod diffusion_kto;
pub mod heads;
pub mod kto;
pub mod metrics;
pub mod objective;
pub mod transform;

pub use objective::{log_sigmoid, sigmoid, LossType, Metrics, Objective, PairScores, PreferenceLoss, LOSS_TYPES};

//! diffalign: align text-to-image diffusion models with human preferences, on candle.
//!
//! Module map (each module uses only those above it):
//! - [`error`]: the `Error` enum and `Result` alias.
//! - [`rng`]: the seeded RNG used for all noise.
//! - [`device`]: device and dtype choice.
//! - [`ops`]: custom ops with forward and backward kernels (convolution, norms, softmax,
//!   attention, per-sample MSE), each beside its composed reference.
//! - [`weights`]: safetensors loading with shape checks and a used-key audit, the diffusers
//!   folder layout and the Hugging Face cache.
//! - [`nn`]: shared differentiable layers (linear, conv, norms, attention).
//! - [`text`]: the CLIP BPE tokenizer.
//! - [`models`]: CLIP text encoders, the UNet and the VAE.
//! - [`schedulers`]: the noise schedule and the step rules.
//! - [`sampling`]: the text-to-image pipeline.
//! - [`preference`]: preference objectives (DPO family, MaPO, SmPO) and their diffusion proxy.
//! - [`reward`]: differentiable image reward models (PickScore, CLIPScore, HPSv2, aesthetic).
//! - [`reno`]: ReNO, reward-based optimisation of the initial noise of one-step models.
//! - [`eval`]: tuned-versus-base comparison statistics (win rates with intervals).
//! - [`world`]: the procedural shapes world and its ground-truth rater.
//! - [`demo`]: the demo on the embedded model; [`assets`]: the embedded shapes-world model and reward.
//! - [`data`]: preference pairs from parquet, JSONL or folders, preprocessing, the latent cache.
//! - [`lm`]: language-model preference components (Llama-family LMs, log-probabilities, reward
//!   models) on the shared [`preference`] core.
//! - [`train`]: the fine-tuning loop, optimizer, checkpoints and report; [`recipe`]: its TOML plans.

pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod json;
pub mod lm;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod preference;
pub mod recipe;
pub mod reno;
pub mod reward;
pub mod rng;
pub mod sampling;
pub mod schedulers;
pub mod shapes;
pub mod text;
pub mod train;
pub mod weights;

pub use error::{Error, Result};

//! diffalign: align text-to-image diffusion models with human preferences, on candle.
//!
//! Module map, in layers: each module uses only modules listed above it (`tests/module_map.rs`
//! checks this against the source).
//! - [`error`]: the `Error` enum and `Result` alias.
//! - [`json`]: reading JSON files with errors that name the file and the place.
//! - [`rng`]: the seeded RNG used for all noise.
//! - [`device`]: the device (`--device`, [`device::DeviceSpec`]) and dtype choice.
//! - [`dist`]: data-parallel runs: the launcher's ranks ([`dist::Launch`]) and the
//!   collectives of a training step over MPI or NCCL ([`dist::Comm`]).
//! - [`ops`]: custom ops with forward and backward kernels (convolution, norms, softmax,
//!   attention, per-sample MSE), each beside its composed reference, and the one kernel choice
//!   of a process ([`ops::KernelConfig`]).
//! - [`weights`]: safetensors loading with shape checks and a used-key audit, the diffusers
//!   folder layout, the Hugging Face cache, LoRA files and single-file checkpoints.
//! - [`nn`]: shared differentiable layers (linear, conv, norms, attention, LoRA).
//! - [`text`]: the CLIP BPE tokenizer.
//! - [`models`]: CLIP text and vision encoders, the UNet, the VAE and Llama-family LMs.
//! - [`schedulers`]: the noise schedule and the step rules.
//! - [`sampling`]: the text-to-image pipeline.
//! - [`optim`]: AdamW, 8-bit AdamW and Adafactor behind one optimizer, SGD, gradient clipping
//!   and learning-rate schedules.
//! - [`preference`]: preference objectives (DPO family, MaPO, SmPO, KTO), reward heads and
//!   transforms, and the diffusion proxy.
//! - [`reward`]: differentiable image reward models (PickScore, CLIPScore, HPSv2, aesthetic).
//! - [`reno`]: ReNO, reward-based optimisation of the initial noise of a text-to-image model.
//! - [`eval`]: tuned-versus-base comparison statistics (win rates with intervals).
//! - [`data`]: preference pairs from parquet, JSONL or folders, preprocessing, the latent cache.
//! - [`lm`]: language-model preference components (log-probabilities, pair batches, reward
//!   models, KTO batches) on the shared [`preference`] core.
//! - [`recipe`]: training recipes (`pipelines/*.toml`) read into a validated, typed plan.
//! - [`train`]: the diffusion fine-tuning loop, checkpoints and report, and the LM trainers.
//! - [`shapes`]: an application on all of the above: the shapes world, its pretrainer, the
//!   embedded model and the demo (used by the command line only).

pub mod data;
pub mod device;
pub mod dist;
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

//! Language-model preference components on the shared preference core: sequence
//! log-probabilities of a Llama-family causal LM ([`logprob`]), pair batches ([`batch`]), reward
//! models with Bradley-Terry or GPM heads ([`reward_model`]). The losses themselves live in
//! [`crate::preference`], which the diffusion side uses too: an LM supplies `logp` (the summed
//! completion log-probability) where diffusion supplies `-0.5 * MSE`.

pub mod batch;
pub mod data;
pub mod kto;
pub mod logprob;
pub mod reward_model;
pub mod rewardbench;
pub mod synthetic;

use candle_core::Tensor;

use crate::models::llama::LlamaForCausalLM;
use crate::Result;
use batch::Sequences;

/// Summed completion log-probabilities `[B]` and completion lengths `[B]` of `seq` under `model`.
pub fn completion_logps(model: &LlamaForCausalLM, seq: &Sequences) -> Result<(Tensor, Tensor)> {
    let logits = model.forward(&seq.input_ids, Some(&seq.attention_mask))?;
    logprob::sequence_logps(&logits, &seq.input_ids, &seq.completion_mask)
}

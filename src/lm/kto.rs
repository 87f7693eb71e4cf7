//! KTO on language-model examples: the batch's sequences, its mismatched KL completions, and
//! the loss of [`crate::preference::kto::Kto`] on their log-probabilities.

use candle_core::{DType, Device, Tensor};

use super::batch::Sequences;
use super::completion_logps;
use super::data::TokenExample;
use crate::models::llama::LlamaForCausalLM;
use crate::preference::kto::Kto;
use crate::Result;

/// KTO's loss on a batch of examples, with the KL completions made by rotating the completions
/// by one within the batch (TRL's mismatched pairs), and the fraction of examples whose
/// log-ratio has the label's sign.
pub fn kto_loss(
    policy: &LlamaForCausalLM,
    reference: &LlamaForCausalLM,
    kto: &Kto,
    picked: &[&TokenExample],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, f64)> {
    let n = picked.len();
    let rows: Vec<(Vec<u32>, usize)> = picked
        .iter()
        .map(|e| (e.seq.tokens.clone(), e.seq.completion_start))
        .collect();
    let kl_rows: Vec<(Vec<u32>, usize)> = (0..n)
        .map(|i| {
            let own = &picked[i].seq;
            let other = &picked[(i + 1) % n].seq;
            let mut t = own.tokens[..own.completion_start].to_vec();
            t.extend_from_slice(&other.tokens[other.completion_start..]);
            (t, own.completion_start)
        })
        .collect();
    let seq = Sequences::from_rows(&rows, pad, device)?;
    let kl = Sequences::from_rows(&kl_rows, pad, device)?;
    let (logp, _) = completion_logps(policy, &seq)?;
    let (ref_logp, _) = completion_logps(reference, &seq)?;
    let (kl_logp, _) = completion_logps(policy, &kl)?;
    let (kl_ref, _) = completion_logps(reference, &kl)?;
    let desirable: Vec<bool> = picked.iter().map(|e| e.desirable).collect();
    let loss = kto.loss(
        &logp,
        &ref_logp.detach(),
        &desirable,
        &kl_logp.detach(),
        &kl_ref.detach(),
    )?;
    let rho = (logp.detach() - ref_logp)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let right = rho
        .iter()
        .zip(&desirable)
        .filter(|(r, d)| (**r > 0.0) == **d && **r != 0.0)
        .count();
    Ok((loss, right as f64 / n as f64))
}

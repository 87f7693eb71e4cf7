//! The loss of one piece of a micro-batch ([`Batch::pieces`]): a pair (or a KTO micro-batch of
//! pairs) through [`DiffusionPreference::loss_with_reference_conditioning`], or a micro-batch of
//! labelled images through [`DiffusionPreference::labelled_loss`], with the MSE means the step
//! reports.

use candle_core::{DType, Tensor};

use super::{mean, Trainer};
use crate::preference::diffusion::{DiffusionPreference, Reference};
use crate::preference::PreferenceLoss;
use crate::train::batches::Batch;
use crate::train::{labelled_conditioning, pair_conditioning};
use crate::Result;

/// What one piece contributes to a step.
pub(super) struct PieceLoss {
    /// The loss (to differentiate) and its metrics.
    pub(super) loss: PreferenceLoss,
    /// Pairs or images in the piece: its weight in the step's means.
    pub(super) n: f64,
    /// Mean MSEs: the policy's on the preferred and rejected images, then the reference's (0
    /// without a reference). For labelled images: over the desirable and the undesirable ones
    /// (as labelled for the method; 0 where the piece has none).
    pub(super) mse: [f64; 4],
}

/// The mean of `values` `[B]` over the rows where `labels` equals `want` (0 when there is none).
fn mean_where(values: &Tensor, labels: &[bool], want: bool) -> Result<f64> {
    let v = values.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let picked: Vec<f64> = v
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l == want)
        .map(|(x, _)| *x)
        .collect();
    Ok(if picked.is_empty() {
        0.0
    } else {
        picked.iter().sum::<f64>() / picked.len() as f64
    })
}

impl Trainer {
    /// The loss of `piece` with the policy against the frozen reference.
    pub(super) fn piece_loss(&self, piece: &Batch) -> Result<PieceLoss> {
        let method = self.plan.method;
        let reference = match self.policy_vb.lora_switch() {
            _ if !self.plan.objective.needs_reference() => None,
            Some(switch) => Some(Reference::PolicyWithoutAdapters(switch)),
            None => Some(Reference::Unet(&self.pipe.unet)),
        };
        let eval = DiffusionPreference {
            policy: &self.policy,
            reference,
            schedule: &self.schedule,
            method,
            objective: self.plan.objective,
        };
        match piece {
            Batch::Pairs(pair) => {
                let cond = pair_conditioning(&self.pipe, pair, method)?;
                let ref_cond = match (&self.text_lora, reference) {
                    (Some(te), Some(_)) => Some(te.reference_conditioning(&self.pipe, pair, method)?),
                    _ => None,
                };
                let out = eval.loss_with_reference_conditioning(pair, &cond, ref_cond.as_ref())?;
                let (rw, rl) = match &out.ref_mse {
                    Some((w, l)) => (mean(w)?, mean(l)?),
                    None => (0.0, 0.0),
                };
                Ok(PieceLoss {
                    n: pair.len() as f64,
                    mse: [mean(&out.mse_w)?, mean(&out.mse_l)?, rw, rl],
                    loss: out.loss,
                })
            }
            Batch::Images(batch) => {
                let (context, added) = labelled_conditioning(&self.pipe, batch)?;
                let out = eval.labelled_loss(batch, &context, added.as_ref())?;
                let labels = &batch.labels;
                Ok(PieceLoss {
                    n: batch.len() as f64,
                    mse: [
                        mean_where(&out.mse, labels, true)?,
                        mean_where(&out.mse, labels, false)?,
                        mean_where(&out.ref_mse, labels, true)?,
                        mean_where(&out.ref_mse, labels, false)?,
                    ],
                    loss: out.loss,
                })
            }
        }
    }
}

//! KTO for unpaired data (Ethayarajh et al., arXiv 2402.01306; TRL's `KTOTrainer`): each example
//! is desirable or undesirable; with `rho = logp - ref_logp` and the batch reference point
//! `z = max(0, mean(logp_kl - ref_logp_kl))` over mismatched completions (detached), the loss
//! is `1 - sigmoid(beta * (rho - z))` for desirable and `1 - sigmoid(beta * (z - rho))` for
//! undesirable examples, weighted and averaged over the batch.

use candle_core::{DType, Tensor};

use super::objective::sigmoid;
use crate::{Error, Result};

/// KTO settings with TRL's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kto {
    /// Beta (0.1).
    pub beta: f64,
    /// Weight of desirable examples (1).
    pub desirable_weight: f64,
    /// Weight of undesirable examples (1).
    pub undesirable_weight: f64,
}

impl Default for Kto {
    fn default() -> Self {
        Kto {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

impl Kto {
    /// The loss (scalar) for policy / reference log-probabilities `[B]`, `desirable` flags, and
    /// the policy / reference log-probabilities `[B]` of the mismatched (KL) completions.
    pub fn loss(
        &self,
        logp: &Tensor,
        ref_logp: &Tensor,
        desirable: &[bool],
        kl_logp: &Tensor,
        kl_ref_logp: &Tensor,
    ) -> Result<Tensor> {
        let b = logp.dim(0)?;
        if desirable.len() != b || b == 0 {
            return Err(Error::input(
                "kto",
                format!("{b} examples but {} desirable flags", desirable.len()),
            ));
        }
        let z = (kl_logp - kl_ref_logp)?
            .mean_all()?
            .detach()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .max(0.0);
        let rho = (logp - ref_logp)?;
        let sign: Vec<f64> = desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
        let weight: Vec<f64> = desirable
            .iter()
            .map(|&d| {
                if d {
                    self.desirable_weight
                } else {
                    self.undesirable_weight
                }
            })
            .collect();
        let dev = logp.device();
        let sign = Tensor::new(sign.as_slice(), dev)?.to_dtype(logp.dtype())?;
        let weight = Tensor::new(weight.as_slice(), dev)?.to_dtype(logp.dtype())?;
        let x = (((rho - z)? * sign)? * self.beta)?;
        let per = ((1.0 - sigmoid(&x)?)? * weight)?;
        Ok(per.mean_all()?)
    }
}

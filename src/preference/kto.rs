//! KTO for unpaired data (Ethayarajh et al., arXiv 2402.01306; TRL's `KTOTrainer`): each example
//! is desirable or undesirable; with `rho = logp - ref_logp` and the batch reference point
//! `z = max(0, mean(logp_kl - ref_logp_kl))` over mismatched completions (detached), the loss
//! is `1 - sigmoid(beta * (rho - z))` for desirable and `1 - sigmoid(beta * (z - rho))` for
//! undesirable examples, weighted and averaged over the batch. [`Utility`] swaps the sigmoid
//! for the alternatives Diffusion-KTO compares (Li et al. 2024, `--halo`).

use candle_core::{DType, Tensor};

use super::objective::{log_sigmoid, sigmoid, Metrics, PreferenceLoss};
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

/// The value function applied to `x = beta * (rho - z)` (desirable) or `beta * (z - rho)`
/// (undesirable); the per-example loss is `weight * (1 - U(x))`, constants dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Utility {
    /// Kahneman-Tversky's (KTO's): `U(x) = sigmoid(x)`, loss `1 - sigmoid(x)`.
    #[default]
    Sigmoid,
    /// Risk-neutral: `U(x) = x`, loss `-x`.
    Linear,
    /// Loss-averse (concave throughout, as DPO's): `U(x) = logsigmoid(x)`, loss `-logsigmoid(x)`.
    LogSigmoid,
}

impl std::str::FromStr for Utility {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sigmoid" => Ok(Utility::Sigmoid),
            "linear" => Ok(Utility::Linear),
            // Diffusion-KTO's script calls it `loss_averse`.
            "log_sigmoid" | "loss_averse" => Ok(Utility::LogSigmoid),
            other => Err(Error::input(
                "halo",
                format!("expected one of sigmoid, linear, log_sigmoid (loss_averse), got {other:?}"),
            )),
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
        Ok(self
            .terms(Utility::Sigmoid, logp, ref_logp, desirable, kl_logp, kl_ref_logp)?
            .0)
    }

    /// The loss on unpaired examples whose reference point is taken over the examples
    /// themselves (Diffusion-KTO's batch estimate; no mismatched completions), with metrics:
    /// `implicit_acc` the fraction of examples with `x > 0` and `reward_margin` the mean `x`.
    pub fn evaluate_unpaired(
        &self,
        utility: Utility,
        policy: &Tensor,
        reference: &Tensor,
        desirable: &[bool],
    ) -> Result<PreferenceLoss> {
        let (loss, x) = self.terms(utility, policy, reference, desirable, policy, reference)?;
        let mean = |t: &Tensor| -> Result<f64> { Ok(t.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let metrics = Metrics {
            loss: mean(&loss)?,
            implicit_acc: Some(mean(&x.gt(0f64)?.to_dtype(DType::F32)?)?),
            reward_margin: Some(mean(&x)?),
        };
        Ok(PreferenceLoss {
            loss,
            margins: Some(x),
            metrics,
        })
    }

    /// The scalar loss and the per-example `x` (sign times beta times `rho - z`).
    fn terms(
        &self,
        utility: Utility,
        logp: &Tensor,
        ref_logp: &Tensor,
        desirable: &[bool],
        kl_logp: &Tensor,
        kl_ref_logp: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
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
        let per = match utility {
            Utility::Sigmoid => (1.0 - sigmoid(&x)?)?,
            Utility::Linear => x.neg()?,
            Utility::LogSigmoid => log_sigmoid(&x)?.neg()?,
        };
        let per = (per * weight)?;
        Ok((per.mean_all()?, x))
    }

    /// Checks beta (> 0) and the weights (>= 0, finite); errors name the setting.
    pub fn validate(&self) -> Result<()> {
        crate::error::positive("beta", self.beta)?;
        for (what, w) in [
            ("kto_lambda_d", self.desirable_weight),
            ("kto_lambda_u", self.undesirable_weight),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(Error::input(what, format!("must be a number >= 0, got {w}")));
            }
        }
        Ok(())
    }
}

/// KTO's settings as `train`'s recipe keys and `loss`'s flags spell them: `kto_lambda_d`,
/// `kto_lambda_u` (both 1 by default) and `halo` (sigmoid, linear or log_sigmoid).
#[derive(Debug, Clone, PartialEq)]
pub struct KtoSettings {
    /// Weight of desirable examples, lambda_D.
    pub kto_lambda_d: f64,
    /// Weight of undesirable examples, lambda_U.
    pub kto_lambda_u: f64,
    /// The value function's name.
    pub halo: String,
}

impl Default for KtoSettings {
    fn default() -> Self {
        KtoSettings {
            kto_lambda_d: 1.0,
            kto_lambda_u: 1.0,
            halo: "sigmoid".into(),
        }
    }
}

impl KtoSettings {
    /// `objective` with these settings when `is_kto`; otherwise an error naming the first
    /// setting that differs from its default (it would be ignored).
    pub fn apply(&self, is_kto: bool, objective: super::Objective) -> Result<super::Objective> {
        if is_kto {
            return objective.with_kto_settings(self.kto_lambda_d, self.kto_lambda_u, self.halo.parse()?);
        }
        let d = KtoSettings::default();
        for (what, set) in [
            ("kto_lambda_d", self.kto_lambda_d != d.kto_lambda_d),
            ("kto_lambda_u", self.kto_lambda_u != d.kto_lambda_u),
            ("halo", self.halo != d.halo),
        ] {
            if set {
                return Err(Error::input(what, "applies to the kto method only"));
            }
        }
        Ok(objective)
    }
}

//! The preference loss table over per-sample log-likelihood proxies.
//!
//! For a pair (w preferred, l rejected) with policy proxies `pi_w`, `pi_l` and frozen-reference
//! proxies `ref_w`, `ref_l`, the implicit reward margin is
//! `h = (pi_w - ref_w) - (pi_l - ref_l)` and `z = beta * s * h`, where `s` is an optional
//! per-pair weight (SmPO's soft-label scale, 1 otherwise). With diffusion's proxy
//! `pi = -0.5 * MSE`, the sigmoid loss at beta 5000 is exactly Diffusion-DPO's
//! `-logsigmoid(-0.5 * beta * ((Lw - Ll) - (Rw - Rl)))`. Losses follow TRL's `DPOTrainer`
//! (`loss_type`, `beta`, `label_smoothing`); MaPO (arXiv 2406.06424, `utils.py::compute_loss`)
//! is reference-free and works on the MSEs themselves.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The DPO-family losses (TRL's `loss_type`), per pair as a function of `z = beta * s * h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// DPO: `-logsigmoid(z)`; with label smoothing `eps` (cDPO):
    /// `-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)`.
    Sigmoid,
    /// SLiC: `relu(1 - z)`.
    Hinge,
    /// IPO: `(s * h - 1 / (2 * beta))^2`.
    Ipo,
    /// Robust DPO: `(-(1 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1 - 2 * eps)`.
    Robust,
}

impl std::str::FromStr for LossType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sigmoid" => LossType::Sigmoid,
            "hinge" => LossType::Hinge,
            "ipo" => LossType::Ipo,
            "robust" => LossType::Robust,
            other => {
                return Err(Error::input(
                    "--loss-type",
                    format!("expected one of sigmoid, hinge, ipo, robust, got {other:?}"),
                ))
            }
        })
    }
}

/// A preference objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// A DPO-family loss against a frozen reference.
    Dpo {
        /// The loss form.
        loss_type: LossType,
        /// Strength of the implicit KL regularisation.
        beta: f64,
        /// Label smoothing `eps` of the sigmoid and robust losses (0 for plain DPO).
        label_smoothing: f64,
    },
    /// MaPO: `mean(L_w) - beta * mean(logsigmoid(margin_scale * (f(L_w) - f(L_l))))` with
    /// `f(L) = snr * L / expm1(snr * L)`, on the policy MSEs `L` (no reference model).
    Mapo {
        /// Weight of the margin term (MaPO's `beta_mapo`, 0.1).
        beta: f64,
        /// Multiplier of the margin, MaPO's `T` = the number of training timesteps (1000).
        margin_scale: f64,
        /// MaPO's `snr_value` (0.5).
        snr: f64,
    },
}

impl Objective {
    /// Whether the objective needs the frozen reference model's proxies.
    pub fn needs_reference(&self) -> bool {
        matches!(self, Objective::Dpo { .. })
    }

    /// Checks the settings; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Objective::Dpo {
                loss_type,
                beta,
                label_smoothing,
            } => {
                if !(beta > 0.0 && beta.is_finite()) {
                    return Err(Error::input("beta", format!("must be a positive number, got {beta}")));
                }
                let eps_ok = match loss_type {
                    LossType::Robust => (0.0..0.5).contains(&label_smoothing),
                    LossType::Sigmoid => (0.0..=0.5).contains(&label_smoothing),
                    _ => label_smoothing == 0.0,
                };
                if !eps_ok {
                    return Err(Error::input(
                        "label_smoothing",
                        format!("{label_smoothing} is not valid for the {loss_type:?} loss"),
                    ));
                }
            }
            Objective::Mapo {
                beta,
                margin_scale,
                snr,
            } => {
                for (what, v) in [("beta", beta), ("margin_scale", margin_scale), ("snr", snr)] {
                    if !(v > 0.0 && v.is_finite()) {
                        return Err(Error::input(what, format!("must be a positive number, got {v}")));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Per-pair inputs, each `[B]` f32: policy proxies, reference proxies (DPO family) and
/// per-pair weights (SmPO).
#[derive(Debug, Clone)]
pub struct PairScores {
    /// Policy log-likelihood proxy of the preferred sample.
    pub policy_w: Tensor,
    /// Policy log-likelihood proxy of the rejected sample.
    pub policy_l: Tensor,
    /// Reference proxies `(w, l)`, for objectives with a reference.
    pub reference: Option<(Tensor, Tensor)>,
    /// Per-pair multipliers of beta (SmPO's `10 * (2p - 1)`), 1 when `None`.
    pub weights: Option<Tensor>,
}

/// Scalar metrics of one evaluation, as logged per step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Metrics {
    /// The loss.
    pub loss: f64,
    /// Fraction of pairs whose margin `z` is positive (DPO family only).
    pub implicit_acc: Option<f64>,
    /// Mean of `z` (the implicit reward margin times beta and weight; DPO family only).
    pub reward_margin: Option<f64>,
}

/// The loss tensor (differentiable) with its metrics.
#[derive(Debug, Clone)]
pub struct PreferenceLoss {
    /// Scalar loss.
    pub loss: Tensor,
    /// Per-pair `z` (DPO family), `[B]`.
    pub margins: Option<Tensor>,
    /// The metrics.
    pub metrics: Metrics,
}

/// `log(sigmoid(x))` computed stably as `-softplus(-x) = min(x, 0) - log1p(exp(-|x|))`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    Ok((x.minimum(0f64)? - (neg_abs.exp()? + 1.0)?.log()?)?)
}

fn mean_scalar(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// MaPO's `f(L) = snr * L / expm1(snr * L)`, with its limit 1 at L = 0 (series below 1e-4).
fn mapo_f(l: &Tensor, snr: f64) -> Result<Tensor> {
    let x = (l * snr)?;
    let small = x.abs()?.lt(1e-4)?;
    let series = ((1.0 - (&x * 0.5)?)? + (x.sqr()? / 12.0)?)?;
    // exp(x) - 1 loses precision for small x, where the series takes over; the direct form is
    // evaluated on a safe stand-in there so that no 0/0 reaches the backward pass.
    let safe_x = small.where_cond(&x.ones_like()?, &x)?;
    let direct = (&safe_x / (safe_x.exp()? - 1.0)?)?;
    Ok(small.where_cond(&series, &direct)?)
}

impl Objective {
    /// Evaluates the objective on per-pair scores.
    pub fn evaluate(&self, s: &PairScores) -> Result<PreferenceLoss> {
        match *self {
            Objective::Dpo {
                loss_type,
                beta,
                label_smoothing: eps,
            } => {
                let (ref_w, ref_l) = s
                    .reference
                    .as_ref()
                    .ok_or_else(|| Error::input("reference", "the DPO family needs reference scores"))?;
                let h = ((&s.policy_w - ref_w)? - (&s.policy_l - ref_l)?)?;
                let sh = match &s.weights {
                    Some(w) => (&h * w)?,
                    None => h,
                };
                let z = (&sh * beta)?;
                let per_pair = match loss_type {
                    LossType::Sigmoid => {
                        let a = (log_sigmoid(&z)? * -(1.0 - eps))?;
                        if eps > 0.0 {
                            (a - (log_sigmoid(&z.neg()?)? * eps)?)?
                        } else {
                            a
                        }
                    }
                    LossType::Robust => {
                        let a = (log_sigmoid(&z)? * -(1.0 - eps))?;
                        ((a + (log_sigmoid(&z.neg()?)? * eps)?)? / (1.0 - 2.0 * eps))?
                    }
                    LossType::Hinge => (1.0 - &z)?.relu()?,
                    LossType::Ipo => (&sh - 1.0 / (2.0 * beta))?.sqr()?,
                };
                let loss = per_pair.mean_all()?;
                let acc = mean_scalar(&z.gt(0f64)?.to_dtype(DType::F32)?)?;
                let metrics = Metrics {
                    loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    implicit_acc: Some(acc),
                    reward_margin: Some(mean_scalar(&z)?),
                };
                Ok(PreferenceLoss {
                    loss,
                    margins: Some(z),
                    metrics,
                })
            }
            Objective::Mapo {
                beta,
                margin_scale,
                snr,
            } => {
                // MaPO works on the MSEs: L = -2 * proxy.
                let l_w = (&s.policy_w * -2.0)?;
                let l_l = (&s.policy_l * -2.0)?;
                let log_odds = (mapo_f(&l_w, snr)? - mapo_f(&l_l, snr)?)?;
                let ratio = log_sigmoid(&(log_odds * margin_scale)?)?;
                let loss = (l_w.mean_all()? - (ratio.mean_all()? * beta)?)?;
                let metrics = Metrics {
                    loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    ..Default::default()
                };
                Ok(PreferenceLoss {
                    loss,
                    margins: None,
                    metrics,
                })
            }
        }
    }
}

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

/// The DPO-family losses (TRL's `loss_type`). With `c_w`, `c_l` the log-ratios
/// `policy - reference` (times the per-pair weight), `h = c_w - c_l`, `z = beta * h`,
/// `r_w = beta * c_w`, `r_l = beta * c_l`, `n` the completion lengths (1 where the proxies have
/// no length) and `eps` the label smoothing, the per-pair losses are as documented per variant;
/// each loss is the mean over pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossType {
    /// DPO: `-logsigmoid(z)`; with label smoothing (cDPO):
    /// `-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)`.
    Sigmoid,
    /// SLiC: `relu(1 - z)`.
    Hinge,
    /// IPO: `(c_w / n_w - c_l / n_l - 1 / (2 * beta))^2` (length-averaged, as TRL).
    Ipo,
    /// Robust DPO: `(-(1 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1 - 2 * eps)`.
    Robust,
    /// EXO: `sigmoid(z) * (logsigmoid(z) - log(1 - eps)) + sigmoid(-z) * (logsigmoid(-z) - log(eps))`.
    ExoPair,
    /// NCA: `-logsigmoid(r_w) - logsigmoid(-r_w) / 2 - logsigmoid(-r_l) / 2`.
    NcaPair,
    /// BCO (no running-mean shift): `-logsigmoid(r_w) - logsigmoid(-r_l)`.
    BcoPair,
    /// Hard-label SPPO: `(c_w - 1 / (2 * beta))^2 + (c_l + 1 / (2 * beta))^2`.
    SppoHard,
    /// AOT: the sigmoid loss on `sort(pi_w - pi_l) - sort(ref_w - ref_l)`, sorted over the batch.
    Aot,
    /// Unpaired AOT: the sigmoid loss on `sort(c_w) - sort(c_l)`.
    AotUnpaired,
    /// APO-zero: `1 - sigmoid(r_w) + sigmoid(r_l)`.
    ApoZero,
    /// APO-down: `sigmoid(r_w) + 1 - sigmoid(z)`.
    ApoDown,
    /// DiscoPOP: with `m = sigmoid(z / tau)`, `(1 - m) * -logsigmoid(z) + m * exp(-z)`.
    Discopop {
        /// TRL's `discopop_tau` (0.05).
        tau: f64,
    },
    /// Length-normalised DPO: `-logsigmoid(beta * (c_w / n_w - c_l / n_l))`.
    SigmoidNorm,
    /// SimPO, reference-free: with `m = beta * (pi_w / n_w - pi_l / n_l) - gamma`,
    /// `-(1 - eps) * logsigmoid(m) - eps * logsigmoid(-m)`.
    Simpo {
        /// TRL's `simpo_gamma` (0.5).
        gamma: f64,
    },
    /// ORPO, reference-free: the token-level mean NLL of the preferred completions
    /// `-sum(pi_w) / sum(n_w)` minus `beta * mean(logsigmoid(log_odds))`, with
    /// `log_odds = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))`, `a = pi / n`. Beta is
    /// ORPO's lambda, as TRL's `ORPOConfig.beta`.
    Orpo,
}

/// Every loss type's name, as `--loss-type` spells it.
pub const LOSS_TYPES: &[&str] = &[
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "orpo",
];

impl LossType {
    /// TRL's name of the loss.
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::Robust => "robust",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop { .. } => "discopop",
            LossType::SigmoidNorm => "sigmoid_norm",
            LossType::Simpo { .. } => "simpo",
            LossType::Orpo => "orpo",
        }
    }

    /// Whether the loss compares against a frozen reference (all but SimPO and ORPO).
    pub fn needs_reference(self) -> bool {
        !matches!(self, LossType::Simpo { .. } | LossType::Orpo)
    }

    /// Sets SimPO's gamma; an error for other losses.
    pub fn with_simpo_gamma(self, gamma: f64) -> Result<Self> {
        self.replaced_by(LossType::Simpo { gamma }, "--simpo-gamma")
    }

    /// Sets DiscoPOP's tau; an error for other losses.
    pub fn with_discopop_tau(self, tau: f64) -> Result<Self> {
        self.replaced_by(LossType::Discopop { tau }, "--discopop-tau")
    }

    /// `with` (the same loss with another parameter) when `self` is that loss, else an error
    /// naming `flag`, the option that sets the parameter.
    fn replaced_by(self, with: LossType, flag: &str) -> Result<Self> {
        if std::mem::discriminant(&self) == std::mem::discriminant(&with) {
            return Ok(with);
        }
        Err(Error::input(
            flag,
            format!("applies to the {} loss, not {}", with.name(), self.name()),
        ))
    }
}

impl std::fmt::Display for LossType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossType {
    type Err = Error;
    /// Parses TRL's names; SimPO and DiscoPOP take TRL's default gamma 0.5 and tau 0.05.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sigmoid" => LossType::Sigmoid,
            "hinge" => LossType::Hinge,
            "ipo" => LossType::Ipo,
            "robust" => LossType::Robust,
            "exo_pair" => LossType::ExoPair,
            "nca_pair" => LossType::NcaPair,
            "bco_pair" => LossType::BcoPair,
            "sppo_hard" => LossType::SppoHard,
            "aot" => LossType::Aot,
            "aot_unpaired" => LossType::AotUnpaired,
            "apo_zero" => LossType::ApoZero,
            "apo_down" => LossType::ApoDown,
            "discopop" => LossType::Discopop { tau: 0.05 },
            "sigmoid_norm" => LossType::SigmoidNorm,
            "simpo" => LossType::Simpo { gamma: 0.5 },
            "orpo" => LossType::Orpo,
            other => {
                return Err(Error::input(
                    "--loss-type",
                    format!("expected one of {}, got {other:?}", LOSS_TYPES.join(", ")),
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
    /// KTO on the pairs split into single examples (preferred desirable, rejected
    /// undesirable), its reference point taken over the batch ([`super::kto`]).
    Kto {
        /// Beta and the desirable / undesirable weights.
        kto: super::kto::Kto,
        /// The value function.
        utility: super::kto::Utility,
    },
}

impl Objective {
    /// A DPO-family objective, validated.
    pub fn dpo(loss_type: LossType, beta: f64, label_smoothing: f64) -> Result<Objective> {
        let objective = Objective::Dpo {
            loss_type,
            beta,
            label_smoothing,
        };
        objective.validate()?;
        Ok(objective)
    }

    /// Whether the objective needs the frozen reference model's proxies.
    pub fn needs_reference(&self) -> bool {
        match self {
            Objective::Dpo { loss_type, .. } => loss_type.needs_reference(),
            Objective::Mapo { .. } => false,
            Objective::Kto { .. } => true,
        }
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
                    LossType::ExoPair => label_smoothing > 0.0 && label_smoothing < 1.0,
                    LossType::Sigmoid | LossType::Aot | LossType::AotUnpaired | LossType::Simpo { .. } => {
                        (0.0..=0.5).contains(&label_smoothing)
                    }
                    _ => label_smoothing == 0.0,
                };
                if !eps_ok {
                    return Err(Error::input(
                        "label_smoothing",
                        format!("{label_smoothing} is not valid for the {loss_type} loss"),
                    ));
                }
                match loss_type {
                    LossType::Discopop { tau } => crate::error::positive("discopop_tau", tau)?,
                    LossType::Simpo { gamma } if !gamma.is_finite() => {
                        return Err(Error::input("simpo_gamma", format!("must be finite, got {gamma}")));
                    }
                    _ => {}
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
            Objective::Kto { kto, .. } => kto.validate()?,
        }
        Ok(())
    }
}

/// Per-pair inputs, each `[B]` f32: policy proxies, reference proxies (DPO family), per-pair
/// weights (SmPO) and lengths (language models' completion token counts).
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
    /// Completion lengths `(n_w, n_l)` of the length-normalised losses, 1 when `None`.
    pub lengths: Option<(Tensor, Tensor)>,
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

/// `sigmoid(x)` as `exp(logsigmoid(x))`: stable, and composed of ops with a backward pass.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
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

/// `-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)`.
fn smoothed_sigmoid_loss(x: &Tensor, eps: f64) -> Result<Tensor> {
    let a = (log_sigmoid(x)? * -(1.0 - eps))?;
    if eps > 0.0 {
        Ok((a - (log_sigmoid(&x.neg()?)? * eps)?)?)
    } else {
        Ok(a)
    }
}

/// `x` sorted ascending along its only dimension, differentiably (a gather by the sort order).
fn sorted(x: &Tensor) -> Result<Tensor> {
    let v = x.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut order: Vec<u32> = (0..v.len() as u32).collect();
    order.sort_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]));
    let idx = Tensor::new(order.as_slice(), x.device())?;
    Ok(x.index_select(&idx, 0)?)
}

/// `log(1 - exp(x))` for `x < 0`, stable at both ends (Maechler's `log1mexp`).
fn log1m_exp(x: &Tensor) -> Result<Tensor> {
    // Near 0, `1 - exp(x)` cancels: use `log(-expm1(x))` with expm1 by its series there.
    let near = x.gt(-0.693)?;
    let far = (x.exp()?.neg()? + 1.0)?.log()?;
    let safe = near.where_cond(x, &(x.ones_like()? * -1.0)?)?;
    let expm1 = (((&safe * (1.0 / 6.0))? + 0.5)?.mul(&safe)? + 1.0)?.mul(&safe)?;
    let exact = (safe.exp()? - 1.0)?;
    // The cubic series is exact to f32 precision for |x| < 1e-3; beyond, exp(x) - 1 is.
    let tiny = safe.abs()?.lt(1e-3)?;
    let em1 = tiny.where_cond(&expm1, &exact)?;
    let near_v = em1.neg()?.log()?;
    Ok(near.where_cond(&near_v, &far)?)
}

/// The DPO family and the reference-free SimPO and ORPO, per [`LossType`].
fn dpo_family(loss_type: LossType, beta: f64, eps: f64, s: &PairScores) -> Result<PreferenceLoss> {
    let weigh = |t: Tensor| -> Result<Tensor> {
        Ok(match &s.weights {
            Some(w) => (t * w)?,
            None => t,
        })
    };
    let per_token = |t: &Tensor, n: Option<&Tensor>| -> Result<Tensor> {
        Ok(match n {
            Some(n) => (t / n)?,
            None => t.clone(),
        })
    };
    let (n_w, n_l) = match &s.lengths {
        Some((w, l)) => (Some(w), Some(l)),
        None => (None, None),
    };
    let reference = || {
        s.reference
            .as_ref()
            .ok_or_else(|| Error::input("reference", format!("the {loss_type} loss needs reference scores")))
    };
    let (per_pair, z) = if loss_type.needs_reference() {
        let (ref_w, ref_l) = reference()?;
        let c_w = weigh((&s.policy_w - ref_w)?)?;
        let c_l = weigh((&s.policy_l - ref_l)?)?;
        let h = (&c_w - &c_l)?;
        let z = (&h * beta)?;
        let (r_w, r_l) = ((&c_w * beta)?, (&c_l * beta)?);
        let half = 1.0 / (2.0 * beta);
        let per_pair = match loss_type {
            LossType::Sigmoid => smoothed_sigmoid_loss(&z, eps)?,
            LossType::Robust => {
                let a = (log_sigmoid(&z)? * -(1.0 - eps))?;
                ((a + (log_sigmoid(&z.neg()?)? * eps)?)? / (1.0 - 2.0 * eps))?
            }
            LossType::Hinge => (1.0 - &z)?.relu()?,
            LossType::Ipo => ((per_token(&c_w, n_w)? - per_token(&c_l, n_l)?)? - half)?.sqr()?,
            LossType::ExoPair => {
                let p = sigmoid(&z)?;
                let q = sigmoid(&z.neg()?)?;
                let a = (p * (log_sigmoid(&z)? - (1.0 - eps).ln())?)?;
                (a + (q * (log_sigmoid(&z.neg()?)? - eps.ln())?)?)?
            }
            LossType::NcaPair => {
                let a = log_sigmoid(&r_w)?.neg()?;
                ((a - (log_sigmoid(&r_w.neg()?)? * 0.5)?)? - (log_sigmoid(&r_l.neg()?)? * 0.5)?)?
            }
            LossType::BcoPair => (log_sigmoid(&r_w)? + log_sigmoid(&r_l.neg()?)?)?.neg()?,
            LossType::SppoHard => ((&c_w - half)?.sqr()? + (&c_l + half)?.sqr()?)?,
            LossType::Aot => {
                let pi = weigh((&s.policy_w - &s.policy_l)?)?;
                let rf = weigh((ref_w - ref_l)?)?;
                smoothed_sigmoid_loss(&((sorted(&pi)? - sorted(&rf)?)? * beta)?, eps)?
            }
            LossType::AotUnpaired => smoothed_sigmoid_loss(&((sorted(&c_w)? - sorted(&c_l)?)? * beta)?, eps)?,
            LossType::ApoZero => ((1.0 - sigmoid(&r_w)?)? + sigmoid(&r_l)?)?,
            LossType::ApoDown => (sigmoid(&r_w)? + (1.0 - sigmoid(&z)?)?)?,
            LossType::Discopop { tau } => {
                let m = sigmoid(&(&z / tau)?)?;
                let logistic = log_sigmoid(&z)?.neg()?;
                (((1.0 - &m)? * logistic)? + (m * z.neg()?.exp()?)?)?
            }
            LossType::SigmoidNorm => {
                let hn = (per_token(&c_w, n_w)? - per_token(&c_l, n_l)?)?;
                log_sigmoid(&(hn * beta)?)?.neg()?
            }
            LossType::Simpo { .. } | LossType::Orpo => unreachable!("reference-free losses handled below"),
        };
        (per_pair, z)
    } else {
        let a_w = weigh(per_token(&s.policy_w, n_w)?)?;
        let a_l = weigh(per_token(&s.policy_l, n_l)?)?;
        match loss_type {
            LossType::Simpo { gamma } => {
                let m = (((&a_w - &a_l)? * beta)? - gamma)?;
                (smoothed_sigmoid_loss(&m, eps)?, m)
            }
            LossType::Orpo => {
                let log_odds = ((&a_w - &a_l)? - (log1m_exp(&a_w)? - log1m_exp(&a_l)?)?)?;
                let ratio = log_sigmoid(&log_odds)?;
                // The NLL is one batch-level term; spread evenly so that the mean gives it back.
                let tokens = match n_w {
                    Some(n) => n.sum_all()?,
                    None => {
                        Tensor::new(s.policy_w.dim(0)? as f32, s.policy_w.device())?.to_dtype(s.policy_w.dtype())?
                    }
                };
                let nll = (s.policy_w.sum_all()?.neg()? / tokens)?;
                let per_pair = (ratio * -beta)?.broadcast_add(&nll)?;
                (per_pair, log_odds)
            }
            _ => unreachable!("every reference-based loss is handled above"),
        }
    };
    let loss = per_pair.mean_all()?;
    let metrics = Metrics {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        implicit_acc: Some(mean_scalar(&z.gt(0f64)?.to_dtype(DType::F32)?)?),
        reward_margin: Some(mean_scalar(&z)?),
    };
    Ok(PreferenceLoss {
        loss,
        margins: Some(z),
        metrics,
    })
}

impl Objective {
    /// Evaluates the objective on per-pair scores.
    pub fn evaluate(&self, s: &PairScores) -> Result<PreferenceLoss> {
        match *self {
            Objective::Dpo {
                loss_type,
                beta,
                label_smoothing: eps,
            } => dpo_family(loss_type, beta, eps, s),
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
            Objective::Kto { kto, utility } => {
                let (ref_w, ref_l) = s
                    .reference
                    .as_ref()
                    .ok_or_else(|| Error::input("reference", "kto needs reference scores"))?;
                let b = s.policy_w.dim(0)?;
                let desirable: Vec<bool> = (0..2 * b).map(|i| i < b).collect();
                let policy = Tensor::cat(&[&s.policy_w, &s.policy_l], 0)?;
                let reference = Tensor::cat(&[ref_w, ref_l], 0)?;
                kto.evaluate_unpaired(utility, &policy, &reference, &desirable)
            }
        }
    }
}

//! Preference metrics over per-pair log-likelihoods (Chen et al., arXiv 2405.19534, "Preference
//! learning algorithms do not learn preference rankings"): reward accuracy, ranking accuracy
//! and its length-normalised form, the idealised ranking accuracy a perfect DPO/RLHF optimum
//! would reach, and the per-pair difficulty of flipping a ranking.

use crate::{Error, Result};

fn check_lengths(what: &str, a: &[f64], b: &[f64]) -> Result<()> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::input(
            what,
            format!("needs two equal, non-empty lists, got {} and {}", a.len(), b.len()),
        ));
    }
    Ok(())
}

fn fraction(hits: impl Iterator<Item = bool>, n: usize) -> f64 {
    hits.filter(|&h| h).count() as f64 / n as f64
}

/// Fraction of pairs whose implicit reward (log-ratio `rho = logp - ref_logp`) is strictly
/// higher for the preferred response (TRL's `rewards/accuracies`).
pub fn reward_accuracy(rho_w: &[f64], rho_l: &[f64]) -> Result<f64> {
    check_lengths("reward accuracy", rho_w, rho_l)?;
    Ok(fraction(rho_w.iter().zip(rho_l).map(|(w, l)| w > l), rho_w.len()))
}

/// Ranking accuracy: fraction of pairs with `logp_w >= logp_l` (Def. 2.3).
pub fn ranking_accuracy(logp_w: &[f64], logp_l: &[f64]) -> Result<f64> {
    check_lengths("ranking accuracy", logp_w, logp_l)?;
    Ok(fraction(logp_w.iter().zip(logp_l).map(|(w, l)| w >= l), logp_w.len()))
}

/// Length-normalised ranking accuracy: `logp / n` compared instead of `logp` (Rem. 2.4).
pub fn normalized_ranking_accuracy(logp_w: &[f64], n_w: &[f64], logp_l: &[f64], n_l: &[f64]) -> Result<f64> {
    check_lengths("ranking accuracy", logp_w, logp_l)?;
    check_lengths("ranking accuracy lengths", n_w, n_l)?;
    check_lengths("ranking accuracy lengths", logp_w, n_w)?;
    let avg_w: Vec<f64> = logp_w.iter().zip(n_w).map(|(l, n)| l / n.max(1.0)).collect();
    let avg_l: Vec<f64> = logp_l.iter().zip(n_l).map(|(l, n)| l / n.max(1.0)).collect();
    ranking_accuracy(&avg_w, &avg_l)
}

/// The β grid of the paper's App. C.4.
pub const IDEAL_BETAS: [f64; 5] = [0.01, 0.1, 1.0, 5.0, 10.0];

/// Idealised ranking accuracy at `beta` (Cor. 3.3): the fraction of pairs with
/// `(ref_w - ref_l) + log(alpha / (1 - alpha)) / beta > 0`, where `alpha` is the fraction of raters
/// preferring w, kept inside `[eps, 1 - eps]` with eps 0.001.
pub fn idealized_ranking_accuracy(ref_w: &[f64], ref_l: &[f64], alpha: &[f64], beta: f64) -> Result<f64> {
    check_lengths("idealised ranking accuracy", ref_w, ref_l)?;
    check_lengths("idealised ranking accuracy rater fractions", ref_w, alpha)?;
    if beta.is_nan() || beta <= 0.0 {
        return Err(Error::input("beta", format!("must be positive, got {beta}")));
    }
    let eps = 1e-3;
    Ok(fraction(
        (0..ref_w.len()).map(|i| {
            let a = alpha[i].clamp(eps, 1.0 - eps);
            (ref_w[i] - ref_l[i]) + (a / (1.0 - a)).ln() / beta > 0.0
        }),
        ref_w.len(),
    ))
}

/// Per-pair difficulty (Thm 4.1): `c = ref_l - ref_w`, and the DPO loss below which the policy
/// ranks the pair correctly, `-logsigmoid(beta * c)`. Large `c` is a hard pair.
pub fn flip_threshold(ref_w: f64, ref_l: f64, beta: f64) -> (f64, f64) {
    let c = ref_l - ref_w;
    let x = beta * c;
    let log_sig = x.min(0.0) - (-x.abs()).exp().ln_1p();
    (c, -log_sig)
}

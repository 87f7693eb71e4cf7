//! Judging a tuned model against its base: paired scores from the same prompts and seeds, mean
//! scores, and the win rate of tuned over base with a Wilson score interval.

use serde::Serialize;

/// The share of pairs where the tuned image scores higher (ties count one half), with its 95%
/// Wilson score interval (Wilson 1927; well behaved at small n and at rates near 0 or 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WinRate {
    /// Pairs compared.
    pub n: usize,
    /// Pairs the tuned image won.
    pub wins: usize,
    /// Pairs with equal scores.
    pub ties: usize,
    /// `(wins + ties / 2) / n`.
    pub rate: f64,
    /// Lower end of the 95% interval.
    pub low: f64,
    /// Upper end of the 95% interval.
    pub high: f64,
}

/// The two-sided 95% normal quantile.
const Z95: f64 = 1.959963984540054;

impl WinRate {
    /// The win rate of `tuned[i]` over `base[i]`; `None` for no pairs or unequal lengths.
    pub fn from_scores(base: &[f64], tuned: &[f64]) -> Option<WinRate> {
        if base.is_empty() || base.len() != tuned.len() {
            return None;
        }
        let wins = base.iter().zip(tuned).filter(|(b, t)| t > b).count();
        let ties = base.iter().zip(tuned).filter(|(b, t)| t == b).count();
        let n = base.len();
        let rate = (wins as f64 + 0.5 * ties as f64) / n as f64;
        let (low, high) = wilson_interval(rate, n, Z95);
        Some(WinRate {
            n,
            wins,
            ties,
            rate,
            low,
            high,
        })
    }
}

/// The Wilson score interval of a proportion `p` over `n` trials at normal quantile `z`.
pub fn wilson_interval(p: f64, n: usize, z: f64) -> (f64, f64) {
    let n = n as f64;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// The mean of `xs` (NaN when empty).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

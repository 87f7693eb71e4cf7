//! Dynamic loss scaling for f16 training, as `torch.amp.GradScaler` with its defaults: the loss
//! is multiplied by the scale before the backward pass so that small f16 gradients do not flush
//! to zero, the accumulated f32 gradients are multiplied by `1 / scale` before clipping and the
//! optimizer step, and a step whose unscaled gradients are not all finite is skipped and halves
//! the scale; 2,000 clean steps in a row double it.

use serde::{Deserialize, Serialize};

/// The scale and its growth counter, saved in checkpoints so that a resumed run continues with
/// the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// The factor on the loss (a power of two).
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: usize,
}

impl LossScale {
    /// `GradScaler`'s `init_scale`.
    pub const INITIAL: f64 = 65536.0;
    /// `growth_factor`: the scale after `GROWTH_INTERVAL` clean steps.
    pub const GROWTH: f64 = 2.0;
    /// `backoff_factor`: the scale after a step with a non-finite gradient.
    pub const BACKOFF: f64 = 0.5;
    /// `growth_interval`.
    pub const GROWTH_INTERVAL: usize = 2000;

    /// The starting state.
    pub fn new() -> Self {
        LossScale {
            scale: Self::INITIAL,
            clean_steps: 0,
        }
    }

    /// The factor that unscales gradients: `1 / scale` rounded to f32, as torch computes it.
    pub fn inverse(&self) -> f64 {
        (1.0 / self.scale) as f32 as f64
    }

    /// Updates the scale after a step whose unscaled gradients were `finite` (or not).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps == Self::GROWTH_INTERVAL {
                self.scale *= Self::GROWTH;
                self.clean_steps = 0;
            }
        } else {
            self.scale *= Self::BACKOFF;
            self.clean_steps = 0;
        }
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}
